"""``fsserve bench BUNDLE_OR_MODEL``: every backend against the plain-transformers baseline, in one run.

Wired into fsserve/cli/main.py with ``add_bench_parser(subparsers)``; the handler is the subparser's
``func`` default. This module prints (it is the CLI); fsserve.bench.run only logs.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from fsserve.cli.args import check_model_source, comma_list

logger = logging.getLogger("fsserve.cli")


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``bench`` command on the main CLI's subparsers and return its parser."""
    from fsserve.bench.backends import ALL_BACKENDS
    from fsserve.config import DEMO_MODES

    p = subparsers.add_parser(
        "bench",
        help="latency and throughput of every backend against plain transformers",
        description="Time the plain-transformers baseline and fsserve's backends on the same inputs, interleaved, "
        "and write JSON, a markdown table and a latency plot.",
    )
    p.add_argument("model", metavar="BUNDLE_OR_MODEL", help="an exported bundle, a saved model folder, or an LM name (e.g. embedded, with SST-2's prompt)")
    p.add_argument("--backends", type=comma_list(str, "names"), default=None,
                   help=f"comma-separated, from {', '.join(ALL_BACKENDS)} (default: all; those this machine lacks are listed with the reason)")
    p.add_argument("--batch-sizes", type=comma_list(int, "integers"), default=(1, 8, 32), help="default 1,8,32")
    p.add_argument("--seq-lens", type=comma_list(int, "integers"), default=(32, 128), help="prompt lengths in tokens (default 32,128)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where the torch backends run, and which backends are the default")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights of the torch backends and the transformers baseline (ONNX graphs stay fp32)")
    p.add_argument("--threads", type=int, help="threads for torch and onnxruntime (default: each library's own)")
    p.add_argument("--spinning", action="store_true",
                   help="let onnxruntime and OpenMP threads busy-wait (their default; off here because on a shared CPU it starves other threads)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per backend and cell")
    p.add_argument("--min-runs", type=int, default=3, help="timed rounds per cell, at least")
    p.add_argument("--max-runs", type=int, default=30, help="timed rounds per cell, at most")
    p.add_argument("--cell-seconds", type=float, default=15.0, help="keep adding rounds to a cell while it has run less than this")
    p.add_argument("--budget", type=float, default=540.0,
                   help="seconds for the whole run: each cell gets a share of what is left, by tokens, and at least one timed round (0: no limit)")
    p.add_argument("--demos", action="store_true", help="also time demonstration selection and the longer prompts it makes")
    p.add_argument("--demo-mode", default="top1", choices=list(DEMO_MODES), help="how each query's demonstrations are picked")
    p.add_argument("--texts", help="CSV/JSONL file of sentences to build inputs from (default: SST-2 dev from the shared data)")
    p.add_argument("--agreement", metavar="TASK_OR_FILE", help="also measure int8-vs-fp32 label agreement on this task's full dev set or file")
    p.add_argument("--agreement-max", type=int, help="a seeded sample of this many agreement examples, each class in its share (not the first N)")
    p.add_argument("--int8-mode", default="dynamic", choices=["dynamic", "weight-only", "per-token"],
                   help="how the int8 graph is made when the bundle has none; per-token: use the bundle's own (calibrated at export)")
    p.add_argument("--per-channel", action="store_true", help="int8: per-channel weight scales")
    p.add_argument("--int8-exclude", type=comma_list(str, "names"), default=(), help="op types left in fp32, e.g. Gather")
    p.add_argument("--int8-nodes", type=comma_list(str, "names"), default=(), help="quantise only the MatMuls whose name contains one of these, e.g. down_proj")
    p.add_argument("--out", default="out/bench", help="folder for bench.json, bench.md, bench.png and cached graphs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_bench_command)
    return p


def run_bench_command(args: argparse.Namespace) -> int:
    """Run the bench, write its outputs and print the table."""
    import os

    check_model_source(args.model)
    if not args.spinning:
        # Read by libgomp when torch loads it, so it must be set before torch is imported.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from fsserve.bench.run import BenchConfig, run_bench
    from fsserve.bench.report import to_markdown, write_outputs

    cfg = BenchConfig(
        backends=None if args.backends in (None, ("all",)) else args.backends,
        batch_sizes=args.batch_sizes,
        seq_lens=args.seq_lens,
        device=args.device,
        dtype=args.dtype,
        warmup=args.warmup,
        min_runs=args.min_runs,
        max_runs=args.max_runs,
        cell_seconds=args.cell_seconds,
        budget_s=args.budget or None,
        threads=args.threads,
        spinning=args.spinning,
        demos=args.demos,
        demo_mode=args.demo_mode,
        texts=args.texts,
        agreement=args.agreement,
        agreement_max=args.agreement_max,
        int8_mode=args.int8_mode,
        per_channel=args.per_channel,
        int8_exclude=tuple(args.int8_exclude),
        int8_nodes=tuple(args.int8_nodes),
        progress=not args.no_progress,
    )
    record = run_bench(args.model, cfg, out_dir=args.out)
    paths = write_outputs(record, args.out)
    print(to_markdown(record))
    print(f"wrote {paths['json']}, {paths['markdown']} and {paths['plot']}")
    return 0
