"""Reports of an LM-BFF protocol run: best-on-dev per seed, mean ± std per task × method, table, JSON, plot.

Scores are shown ×100 as in LM-BFF's tables, as ``mean (std)``; the std is the population std over
seeds (``numpy.std``, ddof=0).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from fsserve.experiment.published import PAPER, published_rows, published_table
from fsserve.utils.atomic import write_json_atomic

logger = logging.getLogger(__name__)

METRIC_NAMES = {"acc": "acc", "f1": "F1", "mcc": "MCC", "pearson": "Pearson"}


def best_per_seed(records: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Pick, for each (task, method, seed), the grid point with the best dev score (LM-BFF's model selection)."""
    best: dict[tuple[str, str, int], dict[str, Any]] = {}
    for record in records:
        s = record["settings"]
        key = (s["task"], s["method"], int(s["seed"]))
        dev = record.get("dev")
        incumbent = best.get(key)
        if incumbent is None or (dev is not None and (incumbent.get("dev") is None or dev > incumbent["dev"])):
            best[key] = record
    return best


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std of the test score over seeds for every task × method (after best-on-dev selection)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for (task, method, _), record in best_per_seed(records).items():
        groups.setdefault((task, method), []).append(record)
    rows = []
    for (task, method), chosen in groups.items():
        scores = np.array([r["test"] for r in chosen], dtype=float)
        rows.append({
            "task": task, "method": method, "metric": chosen[0]["metric"], "n_seeds": len(chosen),
            "seeds": sorted(int(r["settings"]["seed"]) for r in chosen), "mean": float(scores.mean()),
            "std": float(scores.std()), "scores": scores.tolist(),
            "chosen": [{k: r["settings"].get(k) for k in ("seed", "learning_rate", "batch_size")} | {"dev": r.get("dev")} for r in chosen],
            "test_sample": chosen[0].get("test_sample"),  # the same draw for every seed: fixed by the config's test_sample_seed
        })
    return rows


DEMO_METHODS = ("prompt-demo", "prompt-demo-similar")


def demo_gains(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task, how much each demonstration method adds to plain prompt FT on the test score (paired seeds).

    Marks ``helps`` False where the mean paired difference is not above zero, so a report never lets
    demonstrations look like a gain where they are not one.
    """
    best = best_per_seed(records)
    gains = []
    for task in dict.fromkeys(k[0] for k in best):
        plain = {seed: r["test"] for (t, m, seed), r in best.items() if t == task and m == "prompt"}
        for method in DEMO_METHODS:
            demo = {seed: r["test"] for (t, m, seed), r in best.items() if t == task and m == method}
            seeds = sorted(set(plain) & set(demo))
            if not seeds:
                continue
            deltas = [demo[s] - plain[s] for s in seeds]
            gains.append({"task": task, "method": method, "seeds": seeds, "prompt": float(np.mean([plain[s] for s in seeds])),
                          "with_demos": float(np.mean([demo[s] for s in seeds])), "delta": float(np.mean(deltas)),
                          "wins": sum(d > 0 for d in deltas), "helps": bool(np.mean(deltas) > 0)})
    return gains


def gains_table(gains: list[dict[str, Any]]) -> str:
    """The demonstration gains as markdown, with every task where they do not help marked in bold."""
    lines = ["| task | method | prompt FT | with demonstrations | Δ (paired seeds) | seeds better | verdict |",
             "|---|---|---:|---:|---:|---:|---|"]
    for g in gains:
        verdict = "helps" if g["helps"] else "**does not help**"
        lines.append(f"| {g['task']} | {g['method']} | {100 * g['prompt']:.1f} | {100 * g['with_demos']:.1f} | "
                     f"{100 * g['delta']:+.1f} | {g['wins']}/{len(g['seeds'])} | {verdict} |")
    return "\n".join(lines) + "\n"


def markdown_table(rows: list[dict[str, Any]], tasks: list[str], methods: list[str], n_seeds: int) -> str:
    """Methods as rows and tasks as columns (LM-BFF's Table 3 layout); ``mean (std)`` ×100."""
    by = {(r["task"], r["method"]): r for r in rows}
    metric = {r["task"]: r["metric"] for r in rows}
    head = "| method | " + " | ".join(f"{t} ({METRIC_NAMES.get(metric.get(t, ''), '?')})" for t in tasks) + " |"
    lines = [head, "|---|" + "---|" * len(tasks)]
    for method in methods:
        cells = []
        for task in tasks:
            row = by.get((task, method))
            if row is None:
                cells.append("–")
                continue
            text = f"{100 * row['mean']:.1f} ({100 * row['std']:.1f})"
            cells.append(text if row["n_seeds"] == n_seeds else f"{text} [{row['n_seeds']}/{n_seeds} seeds]")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_results(rows: list[dict[str, Any]], tasks: list[str], methods: list[str], path: str | Path) -> Path:
    """Grouped bars (one group per task, one bar per method) with std error bars, written as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the experiment plot needs matplotlib (pip install 'fsserve[bench]')") from err
    by = {(r["task"], r["method"]): r for r in rows}
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(tasks) + 2), 4.0))
    x = np.arange(len(tasks))
    for j, method in enumerate(methods):
        means = [100 * by[(t, method)]["mean"] if (t, method) in by else np.nan for t in tasks]
        stds = [100 * by[(t, method)]["std"] if (t, method) in by else 0.0 for t in tasks]
        ax.bar(x + (j - (len(methods) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=method)
    ax.set_xticks(x, [f"{t}\n({METRIC_NAMES.get(next((r['metric'] for r in rows if r['task'] == t), ''), '?')})" for t in tasks])
    ax.set_ylabel("test score ×100 (mean ± std over seeds)")
    ax.legend(fontsize=8, ncol=min(3, len(methods)))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")  # per process: two runs may share out_dir
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)  # atomic: a reader never sees half a PNG
    return path


def describe_test_set(config: Any) -> str:
    """What the test scores are on, in words, so a table never hides that it was scored on a subset."""
    if config.max_test is None:
        return "the full test sets"
    return (f"a stratified sample of at most {config.max_test} test examples per task (seed {config.test_sample_seed}; "
            "each class, or score bin, in its share of the test set; per-cell draws in results.json)")


def write_reports(config: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Write results.json (settings, cells, summary, LM-BFF's published cells), results.md (ours, then theirs) and results.png."""
    out = Path(config.out_dir)
    rows = summarize(records)
    table = markdown_table(rows, config.tasks, config.methods, len(config.seeds))
    theirs = published_table(config.tasks, config.methods)
    gains = demo_gains(records)
    report = {"config": config.to_dict(), "summary": rows, "cells": records, "table": table, "demo_gains": gains,
              "published": {"paper": PAPER, "cells": published_rows(config.tasks, config.methods)}}
    write_json_atomic(out / "results.json", report)
    text = ("# LM-BFF protocol results\n\n"
            f"**Ours**: model `{config.model}`, k={config.k}, seeds {config.seeds}; test score ×100, mean (std) over "
            f"seeds, each seed's setting chosen by dev, on {describe_test_set(config)}. Settings: see results.json.\n\n" + table)
    if gains:
        text += ("\n**Demonstrations against plain prompt FT** (test, mean over the seeds both have; a task where "
                 "they add nothing is marked):\n\n" + gains_table(gains))
    if theirs:
        text += (f"\n**Theirs** (not run here): {PAPER}. Cells no source could confirm are marked so; "
                 "where each number was read: `fsserve/experiment/published.py`.\n\n" + theirs)
    tmp = out / f".results.md.{os.getpid()}.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out / "results.md")
    plot_results(rows, config.tasks, config.methods, out / "results.png")
    logger.info("wrote %s, results.md and results.png", out / "results.json")
    return report
