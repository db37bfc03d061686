"""``fsserve bench``: latency and throughput of every backend against the plain-transformers baseline, in one run.

For each (sequence length, batch size) cell, every backend gets the same padded batch: real
sentences (SST-2 dev when the shared data is there, else a built-in set) concatenated and
truncated by the model's own prompt to exactly that many tokens. Each backend is warmed up, then
the timed runs are interleaved (one run of each backend per round, the order rotating every
round), so drifting load on a shared machine hits all of them alike; the figure to quote is each
backend's p50 divided into the baseline's p50 from the same cell (``speedup``), since absolute
times on a shared CPU are noise. A cell runs at least ``min_runs`` rounds and keeps going while it
is under ``cell_seconds`` (up to ``max_runs``), so cheap cells get many samples and the costly
baseline cells a few. With a ``budget_s``, each cell also gets a deadline (its share of the time
left, by tokens): past it, no new round starts, though every cell gets at least one timed round;
the number of rounds behind each figure is in the results.

>>> from fsserve.bench.run import BenchConfig, run_bench
>>> record = run_bench("bundles/sst2", BenchConfig(batch_sizes=(1, 32)), out_dir="out/bench")  # doctest: +SKIP
>>> record["results"][0]["speedup"]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from fsserve.bench.backends import ALL_BACKENDS, BASELINE, CPU_DEFAULT, GPU_DEFAULT, Subject
from fsserve.bench.memory import PeakMemory
from fsserve.bench.timing import BenchConfig, cell_rows, exact_length_batch, load_texts, time_cell

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1


# -- the run --------------------------------------------------------------------------------
def _pick_backends(cfg: BenchConfig) -> tuple[list[str], list[dict[str, str]]]:
    """The backends to run here, and every other backend with the reason it is not run."""
    from fsserve.bench.backends import unavailable_reason

    wanted = list(cfg.backends or ALL_BACKENDS)
    defaults = GPU_DEFAULT if cfg.device.startswith("cuda") else CPU_DEFAULT
    run, skipped = [], []
    for name in ALL_BACKENDS:
        reason = unavailable_reason(name, cfg.device)
        if name not in wanted:
            reason = "not asked for (--backends)"
        elif cfg.backends is None and reason is None and name not in defaults:
            reason = f"not a default for --device {cfg.device} (ask for it with --backends)"
        (skipped.append({"backend": name, "reason": reason}) if reason else run.append(name))
    if BASELINE not in run:
        logger.warning("the %s baseline is not run: no speed-up figures", BASELINE)
    return run, skipped


def baseline_oversize(subject: Subject, batch_size: int, seq_len: int, device: str) -> str | None:
    """Why the baseline's B × seq × vocab logits would not fit in memory here, or None."""
    vocab = int(subject.model.lm.get_output_embeddings().weight.shape[0])
    need = 2.2 * batch_size * seq_len * vocab * 4  # logits, plus the copy a soft-capping model makes
    if device.startswith("cuda"):
        import torch

        free = torch.cuda.mem_get_info()[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    if need > 0.7 * free:
        return f"{need / 2**30:.1f} GiB of vocabulary logits > 70% of the {free / 2**30:.1f} GiB free"
    return None


def run_bench(source: str | Path, cfg: BenchConfig | None = None, out_dir: str | Path = "out/bench") -> dict[str, Any]:
    """Run the whole grid (and the demonstration and agreement extras) and return the results record."""
    from tqdm.auto import tqdm

    from fsserve.bench.backends import baseline_rows, build_backend, ensure_graphs, load_subject
    from fsserve.bench.report import machine_info

    cfg = cfg or BenchConfig()
    out = Path(out_dir)
    started = time.perf_counter()
    machine = machine_info(cfg.threads)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    names, skipped = _pick_backends(cfg)
    subject = load_subject(source, out / "graphs")
    if any(n.startswith("onnx") for n in names) or cfg.agreement:
        ensure_graphs(subject, "onnx-int8" in names or bool(cfg.agreement), cfg.int8_mode, cfg.per_channel, cfg.int8_exclude,
                      cfg.int8_nodes)
    if cfg.dtype != "float32":  # after the graphs, which are exported from the fp32 weights
        import torch

        subject.model.to(getattr(torch, cfg.dtype))
    backends = [build_backend(n, subject, cfg.device, cfg.threads, cfg.spinning, out / "trt_cache") for n in names]
    texts, text_source = load_texts(cfg.texts)
    rng = np.random.default_rng(cfg.seed)
    probe = PeakMemory(cfg.device)
    cells = sorted(((s, b) for s in cfg.seq_lens for b in cfg.batch_sizes), key=lambda c: (c[0] * c[1], c[0]))
    # Work left, in tokens per round, to share the remaining budget between cells (demo cells: two prompts each).
    work_left = sum(s * b for s, b in cells) + (sum(cfg.batch_sizes) * cfg.demo_max_length if cfg.demos else 0)

    def deadline(tokens: int) -> float | None:
        """This cell's share of the time left, as a perf_counter deadline."""
        nonlocal work_left
        share = tokens / max(work_left, 1)
        work_left -= tokens
        if cfg.budget_s is None:
            return None
        left = max(0.0, cfg.budget_s - (time.perf_counter() - started))
        # Cheap cells keep a floor, so overheads that do not scale with tokens still get min_runs rounds.
        return time.perf_counter() + max(left * share, min(cfg.cell_seconds, left) / 3)
    results: list[dict[str, Any]] = []
    with tqdm(total=len(cells) + (len(cfg.batch_sizes) if cfg.demos else 0), desc="fsserve bench", unit="cell", disable=not cfg.progress) as bar:
        for seq_len, batch_size in cells:
            bar.set_description(f"seq {seq_len} batch {batch_size}")
            batch = exact_length_batch(subject.model, texts, batch_size, seq_len, rng)
            reason = baseline_oversize(subject, batch_size, seq_len, cfg.device) if BASELINE in names else None
            state = time_cell(backends, batch, cfg, probe, bar, deadline(seq_len * batch_size))
            rows = cell_rows(backends, state, batch_size, seq_len)
            for row in rows:
                if reason and row["backend"] == BASELINE:
                    rows_per_forward = baseline_rows(subject.model, cfg.device)(batch_size, seq_len)
                    row["detail"] += f", in slices of {rows_per_forward} rows ({reason})"
            results += rows
            bar.update(1)
        demos = None
        if cfg.demos:
            from fsserve.bench.extras import demo_costs

            demos = demo_costs(subject, backends, texts, cfg, probe, bar, deadline)
    agreement = None
    if cfg.agreement:
        from fsserve.bench.extras import int8_agreement

        agreement = int8_agreement(subject, cfg)
    return {
        "benchmark": "fsserve bench",
        "schema_version": SCHEMA_VERSION,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": str(source),
        "model": {"type": subject.model.lm.config.model_type, "kind": subject.model.kind, "labels": subject.model.labels,
                  "parameters": int(sum(p.numel() for p in subject.model.lm.parameters()))},
        "machine": machine | {"load_avg_after": _load_avg()},
        "config": cfg.to_dict(),
        "texts": text_source,
        "graphs": {k: str(v) for k, v in subject.graphs.items()},
        "notes": subject.notes,
        "backends": [{"name": b.name, "device": b.device, "detail": b.detail, "load_mb": b.load_mb} for b in backends],
        "results": results,
        "skipped": skipped,
        "demos": demos,
        "agreement": agreement,
        "seconds": time.perf_counter() - started,
    }


def _load_avg() -> list[float] | None:
    """The 1/5/15-minute load averages (what else was running), where the OS reports them."""
    import os

    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None
