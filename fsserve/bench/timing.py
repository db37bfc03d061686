"""The measuring core of ``fsserve bench``: what to measure (BenchConfig), exact-length inputs, interleaved timing.

Each backend is warmed up, then the timed runs are interleaved (one run of each backend per round,
the order rotating every round), so drifting load on a shared machine hits all of them alike.
``fsserve.bench.run`` drives the grid with these pieces; ``fsserve.bench.extras`` reuses them for
the demonstration and int8-agreement extras.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fsserve.bench.backends import ALL_BACKENDS, BASELINE, BenchBackend
from fsserve.bench.memory import PeakMemory

logger = logging.getLogger(__name__)

TORCH_DTYPES = ("float32", "bfloat16", "float16")
# Used only when neither --texts nor the shared SST-2 data is there (tests, fresh machines).
FALLBACK_TEXTS = (
    "A warm, funny and unexpectedly moving film about growing up.",
    "The plot drags, the jokes fall flat and the ending is a mess.",
    "Every performance lands, and the score is gorgeous.",
    "I checked my watch three times before the first act was over.",
    "A clever script that trusts its audience to keep up.",
    "Bland, forgettable and far too long for what it has to say.",
    "The kind of quiet drama that stays with you for days.",
    "Loud, shapeless and in love with its own noise.",
)


@dataclass
class BenchConfig:
    """What to measure and how long to look at each cell.

    >>> BenchConfig(batch_sizes=(1, 8), seq_lens=(32,)).batch_sizes
    (1, 8)
    """

    backends: tuple[str, ...] | None = None  # None: every backend; those this machine lacks are reported as skipped
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    seq_lens: tuple[int, ...] = (32, 128)
    device: str = "cpu"
    dtype: str = "float32"  # the torch backends' weights (the baseline's too); ONNX graphs stay fp32
    warmup: int = 1
    min_runs: int = 3
    max_runs: int = 30
    cell_seconds: float = 15.0
    budget_s: float | None = 540.0  # the whole run, loading included; None: no deadline
    threads: int | None = None
    spinning: bool = False  # onnxruntime/OpenMP busy-waiting: off, because on a shared CPU spinning threads starve each other
    demos: bool = False
    demo_mode: str = "top1"
    demo_max_length: int = 256
    texts: str | None = None
    agreement: str | None = None
    agreement_max: int | None = None
    int8_mode: str = "dynamic"
    per_channel: bool = False
    int8_exclude: tuple[str, ...] = ()
    int8_nodes: tuple[str, ...] = ()  # quantise only the MatMuls whose names contain one of these
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.batch_sizes = tuple(int(b) for b in self.batch_sizes)
        self.seq_lens = tuple(int(s) for s in self.seq_lens)
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be positive integers, got {self.batch_sizes}")
        if not self.seq_lens or min(self.seq_lens) < 8:
            raise ValueError(f"seq_lens must be integers of at least 8 tokens (the prompt's minimum), got {self.seq_lens}")
        if self.backends is not None:
            unknown = [b for b in self.backends if b not in ALL_BACKENDS]
            if unknown or not self.backends:
                raise ValueError(f"unknown backend(s) {unknown or '(none given)'}: choose from {', '.join(ALL_BACKENDS)}")
        if self.warmup < 0 or self.min_runs < 1 or self.max_runs < self.min_runs or self.cell_seconds < 0:
            raise ValueError("need warmup >= 0, min_runs >= 1, max_runs >= min_runs and cell_seconds >= 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(TORCH_DTYPES)}, got {self.dtype!r}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data, recorded with the results."""
        return dataclasses.asdict(self)


# -- inputs ---------------------------------------------------------------------------------
def load_texts(source: str | None) -> tuple[list[str], str]:
    """Sentences to build inputs from: a CSV/JSONL file, else SST-2 dev from the shared data, else a built-in set."""
    from fsserve.data import default_data_dir, load_examples, load_split

    if source:
        return [ex.text for ex in load_examples(source)], str(source)
    sst2 = default_data_dir() / "original" / "SST-2" / "dev.tsv"
    if sst2.is_file():
        return [ex.text for ex in load_split("SST-2", sst2)], str(sst2)
    return list(FALLBACK_TEXTS), "built-in sentences"


def exact_length_batch(model: Any, texts: Sequence[str], batch_size: int, seq_len: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A batch of distinct prompts, each exactly ``seq_len`` tokens: sentences joined, then truncated by the prompt itself."""
    from fsserve.predictor import pad_batch
    from fsserve.prompts import Prompt

    prompt = Prompt(dataclasses.replace(model.prompt_config, max_length=seq_len), model.tokenizer, model.kind)
    width = prompt.template.num_sentences
    rows = []
    for _ in range(batch_size):
        parts: list[str] = []
        while len(" ".join(parts)) < 8 * seq_len:  # far more characters than tokens: the prompt truncates
            parts.append(texts[int(rng.integers(len(texts)))])
        text = " ".join(parts)
        rows.append(text if width == 1 else tuple([text] * width))
    encoded = prompt.encode(rows)
    short = [len(e.input_ids) for e in encoded if len(e.input_ids) != seq_len]
    if short:
        raise ValueError(f"could not build {seq_len}-token prompts from these texts (got {short[:3]} tokens)")
    return pad_batch(encoded, model.pad_token_id, model.uses_token_types)


# -- timing ---------------------------------------------------------------------------------
def summarize(samples_ms: Sequence[float], batch_size: int) -> dict[str, float]:
    """p50/p90/p99/mean/min of one backend's timed runs, and throughput at the median."""
    a = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = (float(x) for x in np.percentile(a, [50, 90, 99]))
    return {"runs": len(a), "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "mean_ms": float(a.mean()), "min_ms": float(a.min()),
            "throughput_per_s": batch_size / (p50 / 1e3)}


def _timed(backend: BenchBackend, batch: dict[str, np.ndarray], probe: PeakMemory) -> tuple[float, float, np.ndarray]:
    """One run: milliseconds (synchronised on GPU), the call's memory peak in MiB, and its output."""
    probe.start()
    backend.sync()
    start = time.perf_counter()
    out = backend.run(batch)
    backend.sync()
    ms = (time.perf_counter() - start) * 1e3
    return ms, probe.stop(), np.asarray(out)


def time_cell(backends: Sequence[BenchBackend], batch: dict[str, np.ndarray], cfg: BenchConfig, probe: PeakMemory,
              bar: Any = None, deadline: float | None = None) -> dict[str, dict[str, Any]]:
    """Warm up every backend, then time interleaved rounds until enough (or the deadline); return samples, peaks, outputs."""
    state = {b.name: {"samples": [], "peak": 0.0, "out": None} for b in backends}
    round_cost = 0.0
    for backend in backends:
        for _ in range(cfg.warmup):
            ms, peak, out = _timed(backend, batch, probe)
            round_cost += ms / 1e3 / max(cfg.warmup, 1)
            state[backend.name]["peak"] = max(state[backend.name]["peak"], peak)
            state[backend.name]["out"] = out
    start, rounds = time.perf_counter(), 0

    def more() -> bool:
        """Whether to start another round: min_runs always (a deadline eaten by warm-up, e.g. kernel
        compilation, must not leave a cell with one sample), more while time allows."""
        now = time.perf_counter()
        if rounds >= cfg.min_runs and deadline is not None and now + round_cost > deadline:
            return False
        return rounds < cfg.min_runs or (rounds < cfg.max_runs and now - start < cfg.cell_seconds)

    while more():
        t_round = time.perf_counter()
        shift = rounds % len(backends)
        for backend in list(backends[shift:]) + list(backends[:shift]):
            ms, peak, out = _timed(backend, batch, probe)
            entry = state[backend.name]
            entry["samples"].append(ms)
            entry["peak"] = max(entry["peak"], peak)
            entry["out"] = out
        round_cost = time.perf_counter() - t_round
        rounds += 1
        if bar is not None:
            bar.set_postfix_str(f"round {rounds}")
    return state


def cell_rows(backends: Sequence[BenchBackend], state: dict[str, dict[str, Any]], batch_size: int, seq_len: int, variant: str = "length") -> list[dict[str, Any]]:
    """Result rows of one cell, with each backend's speed-up over the baseline measured beside it."""
    base = state.get(BASELINE)
    base_p50 = float(np.median(base["samples"])) if base else None
    rows = []
    for backend in backends:
        entry = state[backend.name]
        row: dict[str, Any] = {"backend": backend.name, "device": backend.device, "detail": backend.detail, "variant": variant,
                               "seq_len": seq_len, "batch_size": batch_size, **summarize(entry["samples"], batch_size)}
        row["load_mb"] = backend.load_mb
        row["peak_mb"] = backend.load_mb + entry["peak"]
        row["speedup"] = base_p50 / row["p50_ms"] if base_p50 else None
        if base is not None:
            diff = np.abs(entry["out"].astype(np.float64) - base["out"])
            row["max_abs_diff_vs_baseline"] = float(diff.max())
            row["argmax_agreement_vs_baseline"] = float((entry["out"].argmax(-1) == base["out"].argmax(-1)).mean())
        rows.append(row)
    return rows
