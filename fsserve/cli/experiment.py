"""``fsserve experiment``: run (or resume) the LM-BFF evaluation protocol and write its table and plot.

Wired into fsserve/cli/main.py with ``add_experiment_parser(subparsers)``; the handler is the
subparser's ``func`` default. This module prints (it is the CLI); the library only logs.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fsserve.cli.args import add_demo_format_args, check_model_source, comma_list

logger = logging.getLogger("fsserve.cli")


def add_experiment_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``experiment`` command on the main CLI's subparsers and return its parser."""
    from fsserve.config import PromptConfig

    p = subparsers.add_parser(
        "experiment",
        help="run the LM-BFF protocol over tasks × methods × seeds (cached, resumable)",
        description="Train on each <data>/<task>/<k>-<seed>/train, pick the checkpoint and grid setting by dev, score test; "
                    "report mean (std) over seeds as a markdown table, JSON and a plot. Defaults are LM-BFF's.",
    )
    p.add_argument("--tasks", required=True, help="comma-separated, e.g. SST-2,sst-5,trec,RTE,CoLA,STS-B")
    p.add_argument("--methods", default="zero-shot,in-context,finetune,prompt,prompt-demo,prompt-demo-similar",
                   help="comma-separated subset of zero-shot, in-context, finetune, prompt, prompt-demo, prompt-demo-similar")
    p.add_argument("--seeds", type=comma_list(int, "integers"), default=[13, 21, 42, 87, 100], help="k-shot split seeds (default: LM-BFF's five)")
    p.add_argument("--data", help="k-shot root folder (default: ../shared/data/k-shot)")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--model", default="embedded", help="HF name or folder of an encoder MLM or decoder LM")
    p.add_argument("--out", default="experiments", help="folder for the cell cache, results.{json,md,png}")
    g = p.add_argument_group("budget (defaults: LM-BFF's)")
    g.add_argument("--max-steps", type=int, default=1000)
    g.add_argument("--eval-steps", type=int, default=100)
    g.add_argument("--max-test", type=int,
                   help="score a seeded sample of N test examples, each class (regression: score bin) in its share (default: all)")
    g.add_argument("--test-sample-seed", type=int, default=0, help="seed of the --max-test sample (the same draw for every method and seed)")
    g = p.add_argument_group("optimisation (comma-separated values form a grid; each seed keeps its best-on-dev setting)")
    g.add_argument("--lr", type=comma_list(float, "numbers"), default=[1e-5], help="learning-rate grid (LM-BFF: 1e-5,2e-5,5e-5)")
    g.add_argument("--finetune-lr", type=comma_list(float, "numbers"), help="learning-rate grid for standard fine-tuning (default: --lr)")
    g.add_argument("--batch-size", type=comma_list(int, "integers"), default=[8], help="batch-size grid (LM-BFF: 2,4,8)")
    g.add_argument("--freeze-embeddings", action="store_true", help="freeze input (and tied output) embeddings")
    g.add_argument("--max-length", type=int, default=PromptConfig.max_length, help="prompt length without demonstrations (LM-BFF: 128)")
    g.add_argument("--eval-batch-size", type=int, default=16)
    g = p.add_argument_group("demonstrations and in-context")
    g.add_argument("--num-sample", type=int, default=16, help="demonstration draws averaged at evaluation (LM-BFF: 16)")
    g.add_argument("--filter-rate", type=float, default=0.5, help="'similar' draws from this top fraction")
    g.add_argument("--demo-max-length", type=int, default=256, help="prompt length with demonstrations")
    g.add_argument("--demo-encoder", help="sentence-transformers model (default: all-MiniLM-L6-v2)")
    add_demo_format_args(g)  # a format other than LM-BFF's enters the cells' cache keys
    g.add_argument("--context-length", type=int, default=512, help="in-context: tokens the context and query may fill")
    g.add_argument("--context-examples", type=int, default=32, help="in-context: at most this many examples (LM-BFF: 32)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes sharing the cells on this machine (each claims a cell before computing it; the "
                        "CPU threads are split between them). Running the same command in several shells works too.")
    p.set_defaults(func=run_experiment_command)
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    """Build the ExperimentConfig from parsed arguments."""
    from fsserve.data import default_data_dir
    from fsserve.experiment.protocol import ExperimentConfig

    return ExperimentConfig(
        tasks=args.tasks, methods=args.methods, seeds=args.seeds, data_dir=str(args.data or default_data_dir() / "k-shot"),
        out_dir=args.out, model=args.model, k=args.k, max_steps=args.max_steps, eval_steps=args.eval_steps,
        max_test=args.max_test, test_sample_seed=args.test_sample_seed, learning_rates=args.lr, finetune_learning_rates=args.finetune_lr, batch_sizes=args.batch_size,
        freeze_embeddings=args.freeze_embeddings, max_length=args.max_length, demo_max_length=args.demo_max_length,
        context_length=args.context_length, context_examples=args.context_examples, num_sample=args.num_sample,
        filter_rate=args.filter_rate, demo_encoder=args.demo_encoder, eval_batch_size=args.eval_batch_size,
        demo_order=args.demo_order, demo_separator=args.demo_separator, demo_per_class=args.demos_per_class,
        demo_label_after=args.demo_label_after,
    )


def _progress(config: Any) -> Any:
    """A per-cell callback that prints one progress line (computed cells show their time, others 'cached')."""
    from fsserve.experiment.protocol import iter_cells

    total = sum(1 for _ in iter_cells(config))
    done = 0

    def show(cell: Any, record: dict[str, Any], cached: bool) -> None:
        nonlocal done
        done += 1
        dev = "" if record.get("dev") is None else f" dev {100 * record['dev']:.1f}"
        grid = f" lr {cell.learning_rate:g} bs {cell.batch_size}" if cell.batch_size else ""
        how = "cached" if cached else f"{record.get('seconds', 0):.0f}s"
        print(f"[{done}/{total}] {cell.task} {cell.method} seed {cell.seed}{grid}:{dev} test {100 * record['test']:.1f} "
              f"({record['metric']}, n={record['n_test']}) [{how}]", flush=True)

    return show


def _start_workers(config: Any, extra: int, threads: int) -> list[tuple[subprocess.Popen, Path]]:
    """Start ``extra`` helper processes on the same experiment, ``threads`` each, logging to ``<out>/worker-<i>.log``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    code = "import sys; from fsserve.cli.experiment import worker_main; sys.exit(worker_main(sys.argv[1]))"
    workers = []
    for i in range(1, extra + 1):
        log = out / f"worker-{i}.log"
        with log.open("w", encoding="utf-8") as f:
            proc = subprocess.Popen([sys.executable, "-c", code, config.to_json()], stdout=f, stderr=subprocess.STDOUT, env=env)
        workers.append((proc, log))
    return workers


def worker_main(config_json: str) -> int:
    """Entry point of a helper started by ``--workers``: run the same experiment, claiming free cells."""
    import json

    from fsserve.experiment.protocol import ExperimentConfig, run_experiment

    logging.basicConfig(level=logging.WARNING)
    config = ExperimentConfig.from_dict(json.loads(config_json))
    run_experiment(config, on_cell=_progress(config))
    return 0


def run_experiment_command(args: argparse.Namespace) -> int:
    """Run the protocol, printing one line per cell, then the table and where the reports are."""
    from fsserve.experiment.protocol import run_experiment

    check_model_source(args.model, try_hub=False)  # cached cells never load it
    if args.workers < 1:
        print(f"error: --workers must be at least 1, got {args.workers}", file=sys.stderr)
        return 2
    config = config_from_args(args)
    workers = []
    if args.workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // args.workers)
        workers = _start_workers(config, args.workers - 1, threads)
        torch.set_num_threads(threads)  # this process is one of the workers too
    try:
        report = run_experiment(config, on_cell=_progress(config))
    except BaseException:
        for proc, _ in workers:  # an interrupted run stops its helpers; their finished cells stay cached
            proc.terminate()
        raise
    failed = [log for proc, log in workers if proc.wait() != 0]
    print()
    print(report["table"], end="")
    if report.get("demo_gains"):
        from fsserve.experiment.report import gains_table

        print("\nDemonstrations against plain prompt FT (test, paired seeds):")
        print(gains_table(report["demo_gains"]), end="")
    from fsserve.experiment.published import published_table

    theirs = published_table(config.tasks, config.methods)
    if theirs:
        print("\nLM-BFF's published RoBERTa-large numbers (theirs, not run here; sources in fsserve/experiment/published.py):")
        print(theirs, end="")
    out = Path(config.out_dir)
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'}, {out / 'results.png'}")
    if failed:
        print(f"a helper worker failed (its cells were taken over): see {', '.join(map(str, failed))}", file=sys.stderr)
        return 1
    return 0
