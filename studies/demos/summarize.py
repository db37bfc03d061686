"""Summarise the demonstrations study's cached cells: phase 1 by dev score, phase 2 by test score.

Reads every ``studies/demos/<level>/cells/<task>/<method>/seed-*.json`` that ``run.sh`` left and prints
markdown. Phase 1 (every level but ``phase2``): for each level and method, the mean dev score per task
over the seeds done (with their count), the mean over tasks, and its paired difference to the base
level's prompt-demo-similar cells; choices read only this table. Phase 2 (``studies/demos/phase2``):
mean dev and test score per task and method, LM-BFF's published RoBERTa-large cells
(``fsserve.experiment.published``; "not confirmed" where no readable source shows one) with the gap
to them, and the issue's two targets on the test means (demonstrations - prompt FT >= +1, prompt FT -
standard FT >= +10, averaged over the tasks all three methods have; per task on the seeds both have), beside the same gap in LM-BFF's
own cells where a source confirms both.

    .venv/bin/python studies/demos/summarize.py            # phase 1's dev table, then phase 2's
    .venv/bin/python studies/demos/summarize.py --test     # phase 1's test means too (never read for a choice)
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from fsserve.experiment.published import published_score

ROOT = Path(__file__).resolve().parent
PHASE2_TASKS = ("SST-2", "sst-5", "trec", "RTE")
PHASE2_METHODS = ("prompt", "prompt-demo-similar", "finetune")


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


def phase2_table(cells: dict[tuple[str, str, str], list[dict]]) -> str:
    """Phase 2: dev and test means per task and method, and the two targets on the test means."""
    done = {(task, method) for level, task, method in cells if level == "phase2"}
    tasks = [t for t in PHASE2_TASKS if any(task == t for task, _ in done)]
    methods = [m for m in PHASE2_METHODS if any(method == m for _, method in done)]
    lines = ["| method | " + " | ".join(f"{t} dev / test (seeds)" for t in tasks) + " | mean test |",
             "| --- | " + " | ".join("---:" for _ in tasks) + " | ---: |"]
    by_seed: dict[str, dict[str, dict[int, float]]] = {}  # method -> task -> seed -> test

    def mean_test(method: str, task: str) -> float | None:
        """The method's mean test score on the task over its seeds, None before its first cell."""
        got = by_seed.get(method, {}).get(task)
        return statistics.mean(got.values()) if got else None

    def paired(better: str, worse: str, task: str) -> float:
        """Mean test gap on the seeds both methods have (a task still running compares like with like)."""
        a, b = by_seed[better][task], by_seed[worse][task]
        return statistics.mean(a[seed] - b[seed] for seed in a if seed in b)

    for method in methods:
        cols = []
        for task in tasks:
            got = cells.get(("phase2", task, method), [])
            if not got:
                cols.append("—")
                continue
            dev, test = (100 * statistics.mean(c[k] for c in got) for k in ("dev", "test"))
            by_seed.setdefault(method, {})[task] = {c["settings"]["seed"]: 100 * c["test"] for c in got}
            cols.append(f"{dev:.1f} / {test:.1f} ({len(got)})")
        scored = by_seed.get(method, {})
        mean = f"{statistics.mean(mean_test(method, t) for t in scored):.1f}" if len(scored) == len(PHASE2_TASKS) else "—"
        lines.append(f"| {method} | {' | '.join(cols)} | {mean} |")
    for method in methods:
        cols = []
        for task in tasks:
            score, ours = published_score(task, method), mean_test(method, task)
            gap = f" ({ours - score.mean:+.1f} ours)" if score is not None and ours is not None else ""
            cols.append(f"{score}{gap}" if score is not None else "not confirmed")
        lines.append(f"| *LM-BFF* {method} (test) | {' | '.join(cols)} | |")
    for better, worse, need in (("prompt-demo-similar", "prompt", 1.0), ("prompt", "finetune", 10.0)):
        shared = [t for t in tasks if by_seed.get(better, {}).get(t, {}).keys() & by_seed.get(worse, {}).get(t, {}).keys()]
        if shared:
            gap = statistics.mean(paired(better, worse, t) for t in shared)
            verdict = "met" if gap >= need else "missed"
            if len(shared) < len(PHASE2_TASKS):
                verdict += f" so far, {len(shared)} of {len(PHASE2_TASKS)} tasks"
            lines.append(f"\n{better} - {worse} over {', '.join(shared)}: {gap:+.1f} (target >= +{need:g}: {verdict})")
            theirs = {t: (published_score(t, better), published_score(t, worse)) for t in PHASE2_TASKS}
            both = [t for t, (b, w) in theirs.items() if b is not None and w is not None]
            if both:
                own = statistics.mean(theirs[t][0].mean - theirs[t][1].mean for t in both)
                ours = [paired(better, worse, t) for t in both if t in shared]
                ours_txt = f"; ours over the same tasks: {statistics.mean(ours):+.1f}" if len(ours) == len(both) else ""
                lines.append(f"  LM-BFF's published cells over {', '.join(both)} (both confirmed): {own:+.1f}{ours_txt}")
    return "\n".join(lines)


def main() -> None:
    """Print phase 1's dev table (its test table with --test), then phase 2's."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", action="store_true", help="also print phase 1's mean test scores (no choice reads them)")
    args = parser.parse_args()
    cells = load_cells()
    phase1 = {key: got for key, got in cells.items() if key[0] != "phase2"}
    print(table(phase1, "dev"))
    if args.test:
        print()
        print(table(phase1, "test"))
    if any(key[0] == "phase2" for key in cells):
        print()
        print(phase2_table(cells))


if __name__ == "__main__":
    main()
