"""What ``fsserve bench`` writes: the machine it ran on, a markdown table and a latency plot, next to the JSON.

``write_outputs(record, out_dir)`` writes ``bench.json``, ``bench.md`` and ``bench.png`` atomically
(each appears whole or not at all) and returns their paths.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from fsserve.sampling import describe_sample
from fsserve.utils.atomic import write_json_atomic

_PACKAGES = ("fsserve", "torch", "transformers", "onnxruntime", "onnxruntime-gpu", "onnx", "numpy", "tokenizers", "triton",
             "tensorrt", "faiss-cpu", "sentence-transformers", "grpcio")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def gpu_name() -> str | None:
    """The first CUDA device's name, or None on a machine without one."""
    from fsserve.utils.device import cuda_available

    if not cuda_available():
        return None
    import torch

    return str(torch.cuda.get_device_name(0))


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """CPU, cores, memory, GPU, library versions and load: what a timing must be read with."""
    import psutil

    versions = {}
    for name in _PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu_name(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "threads": threads,
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS") if k in os.environ},
        "load_avg_before": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    with contextlib.suppress(ImportError):
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    with contextlib.suppress(ImportError):
        import torch

        info["torch_threads"] = torch.get_num_threads()
    return info


def _fmt(value: Any, digits: int = 2) -> str:
    """A table cell: numbers rounded, missing ones as n/a."""
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _result_table(rows: list[dict[str, Any]], baseline: str) -> list[str]:
    """Markdown rows of latency results, the speed-up over the baseline last."""
    lines = [
        f"| seq | batch | backend | p50 ms | p90 ms | p99 ms | sentences/s | peak MB | × vs {baseline} (p50) | runs |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        speedup = f"**{r['speedup']:.2f}×**" if r.get("speedup") else "n/a (baseline not run)"
        lines.append(
            f"| {r['seq_len']} | {r['batch_size']} | {r['backend']} | {_fmt(r['p50_ms'], 1)} | {_fmt(r['p90_ms'], 1)} | {_fmt(r['p99_ms'], 1)} "
            f"| {_fmt(r['throughput_per_s'], 1)} | {_fmt(r['peak_mb'], 0)} | {speedup} | {r['runs']} |"
        )
    return lines


def to_markdown(record: dict[str, Any]) -> str:
    """The results as markdown: the machine, the latency table, skipped backends, demonstrations, agreement."""
    m = record["machine"]
    lines = [
        f"`fsserve bench {record['source']}` — {record['date']}, {record['seconds']:.0f} s",
        "",
        f"Machine: {m['cpu']} ({m['logical_cores']} logical / {m['physical_cores']} physical cores, {m['memory_gib']} GiB), "
        f"GPU: {m['gpu'] or 'none'}; load average before {m['load_avg_before']}, after {m.get('load_avg_after')}; "
        f"threads {m['threads'] or 'library defaults'}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
        f"Model: {record['model']['type']} ({record['model']['kind']}, {record['model']['parameters']:,} parameters); inputs from {record['texts']}.",
        "",
    ]
    lines += _result_table([r for r in record["results"]], "transformers")
    sliced = [r for r in record["results"] if "slices" in r.get("detail", "")]
    if sliced:
        lines += [""] + [f"Baseline at seq {r['seq_len']} batch {r['batch_size']}: {r['detail']}." for r in sliced]
    if record.get("skipped"):
        lines += ["", "Not run:"] + [f"- {s['backend']}: {s['reason']}" for s in record["skipped"]]
    demos = record.get("demos")
    if demos:
        lines += ["", f"Demonstrations ({demos['mode']}, pool: {demos['pool']}, encoder {demos['encoder']}):", "",
                  "| backend | batch | seq plain → demos | plain p50 ms | demos p50 ms | sequence cost | selection p50 ms | total p50 ms |",
                  "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        for s in demos["summary"]:
            lines.append(f"| {s['backend']} | {s['batch_size']} | {s['seq_plain']} → {s['seq_demos']} | {s['plain_p50_ms']:.1f} | "
                         f"{s['demos_p50_ms']:.1f} | {s['sequence_cost']:.2f}× | {s['selection_p50_ms']:.1f} | {s['total_p50_ms']:.1f} |")
    agreement = record.get("agreement")
    if agreement:
        acc = agreement.get("accuracy")
        shown = f"; accuracy fp32 {acc['fp32']:.4f}, int8 {acc['int8']:.4f}" if acc else ""
        drawn = describe_sample(agreement["sample"]) if agreement.get("sample") else f"{agreement['examples']} examples"
        lines += ["", f"int8 vs fp32 on {agreement['on']} ({drawn}): same label on "
                      f"{agreement['int8_vs_fp32']:.2%}, max |Δ logit| {agreement['max_abs_diff']:.3g}{shown}."]
    return "\n".join(lines) + "\n"


def plot_latency(record: dict[str, Any], path: str | Path) -> Path:
    """A PNG of p50 latency against batch size, one line per backend, one panel per sequence length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in record["results"] if r.get("variant", "length") == "length"]
    seq_lens = sorted({r["seq_len"] for r in rows})
    fig, axes = plt.subplots(1, len(seq_lens), figsize=(5.5 * len(seq_lens), 4.2), squeeze=False)
    for ax, seq in zip(axes[0], seq_lens):
        for backend in dict.fromkeys(r["backend"] for r in rows):
            points = sorted((r["batch_size"], r["p50_ms"], r["p90_ms"]) for r in rows if r["seq_len"] == seq and r["backend"] == backend)
            if not points:
                continue
            xs, p50, p90 = zip(*points)
            ax.errorbar(xs, p50, yerr=[[0] * len(xs), [b - a for a, b in zip(p50, p90)]], marker="o", capsize=3, label=backend)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("latency per batch, ms (p50, bar to p90)")
        ax.set_title(f"sequence length {seq}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    device = record["machine"]["gpu"] or record["machine"]["cpu"]
    fig.suptitle(f"fsserve bench: {record['model']['type']} on {device}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_outputs(record: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write bench.json, bench.md and bench.png into out_dir (each atomically) and return their paths."""
    out = Path(out_dir)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md", "plot": out / "bench.png"}
    write_json_atomic(paths["json"], record)
    write_text_atomic(paths["markdown"], to_markdown(record))
    plot_latency(record, paths["plot"])
    return paths


def write_json_and_markdown(path: str | Path, record: dict[str, Any], markdown: str) -> str:
    """Write a benchmark script's record as JSON at ``path`` and its markdown beside it (``.md``); return what it says."""
    out = Path(path)
    write_json_atomic(out, record)
    write_text_atomic(out.with_suffix(".md"), markdown)
    return f"\n{markdown}\nwrote {out} and {out.with_suffix('.md')}"


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file through a temporary sibling and a rename, so a reader never sees half a table."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
