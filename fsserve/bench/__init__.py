"""``fsserve bench``: latency and throughput of every backend beside plain transformers, in one run.

- ``backends``: what is timed (the model, its graphs, each backend as one callable, the baseline);
- ``timing``: :class:`BenchConfig`, exact-length inputs, interleaved warm-up and timed rounds;
- ``run``: the grid of batch sizes × sequence lengths, the results record;
- ``extras``: what demonstrations cost per query, int8 label agreement with fp32;
- ``memory``: load and peak memory; ``report``: machine info, markdown table, plot, JSON.

May import the whole library (it measures it); never serving or the CLI.
Names are imported lazily: ``import fsserve.bench`` does not import torch.

>>> from fsserve.bench import BenchConfig, run_bench  # doctest: +SKIP
>>> record = run_bench("bundles/sst2", BenchConfig(batch_sizes=(1, 32)), out_dir="out/bench")  # doctest: +SKIP
"""

from __future__ import annotations

from fsserve.utils.lazy import lazy_exports

_TIMING = ("FALLBACK_TEXTS", "TORCH_DTYPES", "BenchConfig", "cell_rows", "exact_length_batch", "load_texts", "summarize", "time_cell")
_LAZY = {name: "fsserve.bench.timing" for name in _TIMING}
_LAZY |= {name: "fsserve.bench.run" for name in ("SCHEMA_VERSION", "baseline_oversize", "run_bench")}
_LAZY |= {name: "fsserve.bench.report" for name in ("machine_info", "to_markdown", "write_outputs")}

__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
