"""Summarise the demonstrations study's cached cells: phase 1 by dev score, phase 2 by test score.

Reads every ``studies/demos/<level>/cells/<task>/<method>/seed-*.json`` that ``run.sh`` left and prints
markdown: for each level and method, the mean dev score per task over the seeds done (with their
count), the mean over tasks, and its difference to the base level's prompt-demo-similar cells.
Phase 1 choices read only the dev columns; the test columns are there for phase 2's levels.

    .venv/bin/python studies/demos/summarize.py            # every level
    .venv/bin/python studies/demos/summarize.py --test     # add mean test scores (phase 2 only)
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def load_cells(root: Path = ROOT) -> dict[tuple[str, str, str], list[dict]]:
    """Cells by (level, task, method), each list sorted by seed."""
    cells: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for path in sorted(root.glob("*/cells/*/*/seed-*.json")):
        level, _, task, method = path.parts[-5:-1]
        cell = json.loads(path.read_text(encoding="utf-8"))
        cells[(level, task, method)].append(cell)
    for key in cells:
        cells[key].sort(key=lambda c: c["settings"]["seed"])
    return cells


def table(cells: dict[tuple[str, str, str], list[dict]], score: str = "dev") -> str:
    """A markdown table of mean scores (percent) per level and method, one column per task."""
    tasks = sorted({task for _, task, _ in cells})
    rows = sorted({(level, method) for level, _, method in cells}, key=lambda r: (r[0] != "base", r[0], r[1]))
    base = {task: cells.get(("base", task, "prompt-demo-similar")) for task in tasks}
    lines = [f"| level | method | {' | '.join(f'{t} {score} (seeds)' for t in tasks)} | mean | Δ vs base demos |",
             "| --- | --- | " + " | ".join("---:" for _ in tasks) + " | ---: | ---: |"]
    for level, method in rows:
        means, deltas, cols = [], [], []
        for task in tasks:
            got = cells.get((level, task, method), [])
            if not got:
                cols.append("—")
                continue
            mean = 100 * statistics.mean(c[score] for c in got)
            means.append(mean)
            cols.append(f"{mean:.1f} ({len(got)})")
            ref = {c["settings"]["seed"]: c[score] for c in base[task] or []}
            paired = [100 * (c[score] - ref[c["settings"]["seed"]]) for c in got if c["settings"]["seed"] in ref]
            deltas += paired
        mean = f"{statistics.mean(means):.1f}" if means else "—"
        delta = f"{statistics.mean(deltas):+.1f}" if deltas and (level, method) != ("base", "prompt-demo-similar") else "—"
        lines.append(f"| {level} | {method} | {' | '.join(cols)} | {mean} | {delta} |")
    return "\n".join(lines)


def main() -> None:
    """Print the dev table (and the test table with --test)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", action="store_true", help="also print mean test scores (read them for phase 2 only)")
    args = parser.parse_args()
    cells = load_cells()
    print(table(cells, "dev"))
    if args.test:
        print()
        print(table(cells, "test"))


if __name__ == "__main__":
    main()
