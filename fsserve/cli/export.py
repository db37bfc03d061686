"""``fsserve export MODEL_DIR OUT_DIR``: a saved model to a validated bundle (and a Triton repository).

Wired into fsserve/cli/main.py with ``add_export_parser(subparsers)``; the handler is set as the
subparser's ``func`` default, so the main CLI calls ``args.func(args)``. This module prints
(it is the CLI); the library it calls only logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from fsserve.cli.args import check_model_source

logger = logging.getLogger("fsserve.cli")
AGREEMENT_FLOOR = 0.99  # below this share of fp32's labels, export warns loudly


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``export`` command on the main CLI's subparsers and return its parser."""
    p = subparsers.add_parser(
        "export",
        help="export a saved model to a self-contained ONNX bundle",
        description="Export a saved fsserve model (from `fsserve train`) to an ONNX bundle, validated against torch.",
    )
    p.add_argument("model_dir", help="a folder written by `fsserve train` / PromptModel.save_pretrained")
    p.add_argument("out_dir", help="the bundle folder to write (replaced atomically if it exists)")
    p.add_argument("--quantize", choices=["int8"], help="int8 quantisation, for CPU serving (recipe: --int8-mode)")
    p.add_argument("--int8-mode", default="auto", choices=["auto", "per-token", "dynamic", "weight-only"],
                   help="auto = per-token (int8 arithmetic with a scale per token, GPTQ weights, outlier channels in float: "
                   "fast and faithful, calibrated on --calibration-file); dynamic = one activation scale per batch (faster, "
                   "less faithful); weight-only keeps float activations (slower on CPU, pair it with --int8-nodes)")
    p.add_argument("--calibration-file", help="int8 per-token: .csv/.jsonl/.txt of the task's training texts (labels unused; never dev "
                   "or test) that calibrate the graph; a quarter is held out to measure agreement unless --validation-file is given")
    p.add_argument("--int8-centred", action=argparse.BooleanOptionalAction, default=None,
                   help="int8 per-token: centre each token's row on its range before quantising (finer levels for lopsided rows, "
                   "3-8%% slower). Default: symmetric, unless it keeps fewer than 99%% of fp32's labels on the held-out "
                   "calibration texts; then the more faithful of the two")
    p.add_argument("--int8-outliers", type=int, default=None, help="int8 per-token: input channels per MatMul kept in float (default 32)")
    p.add_argument("--int8-keep-float", type=_name_parts, default=None, metavar="PARTS",
                   help="int8 per-token: leave the MatMuls whose node name contains one of these (comma-separated, e.g. down_proj) "
                   "in float; 'none' for none. Default: all int8, unless held-out agreement stays below 99%% after centring; then the "
                   "feed-forward down projections too if that keeps more labels (slower)")
    p.add_argument("--per-channel", action="store_true", help="int8: per-channel weight scales")
    p.add_argument("--int8-nodes", type=lambda s: tuple(x for x in s.split(",") if x), default=(),
                   help="int8: quantise only the MatMuls whose name contains one of these (comma-separated, e.g. down_proj)")
    p.add_argument("--fp16", action="store_true", help="half-precision graph, for GPU serving")
    p.add_argument("--format", default="onnx", choices=["onnx", "tensorrt"], help="tensorrt: a graph for the TensorRT provider")
    p.add_argument("--no-optimize", action="store_true", help="skip the offline graph optimisation (onnxruntime's transformer fusions, shape folding, GELU fusion)")
    p.add_argument("--with-torch", action="store_true", help="also store the torch model in the bundle (for --backend torch on it; doubles its size)")
    p.add_argument("--no-torch-weights", action="store_true", help=argparse.SUPPRESS)  # the default since the layout release; kept for old scripts
    p.add_argument("--weights", choices=["fp32", "fp16"], default=None,
                   help="how the graph's float weights are stored: fp16 halves the bundle (widened to fp32 at load; agreement measured)")
    p.add_argument("--embedding-bits", type=int, choices=[8], help="store the input embedding as int8 rows with a scale per row, lossy "
                   "(a table already on an exact 8-bit grid, as the embedded Gemma's, is stored so by default, losslessly)")
    p.add_argument("--no-exact-embedding", action="store_true", help="keep the input embedding float32 even where 8 bits hold it exactly")
    p.add_argument("--embedding-block", type=int, help="with --embedding-bits 8: a scale per this many values of a row (e.g. 32; "
                   "per-token int8 uses 32 by default)")
    p.add_argument("--atol", type=float, help="fp32 validation bound against torch, relative to max(1, |logit|) (default 1e-4)")
    p.add_argument("--validation-file", help="CSV/JSONL of texts on which int8/fp16 agreement with fp32 is measured")
    p.add_argument("--triton-repository", metavar="DIR", help="also write a Triton Inference Server model repository here")
    p.add_argument("--triton-model-name", default="fsserve")
    p.add_argument("--triton-kind", default="KIND_CPU", choices=["KIND_CPU", "KIND_GPU"])
    p.add_argument("--triton-instances", type=int, default=1)
    p.add_argument("--triton-text", action="store_true", help="make the Triton repository take text: an ensemble TEXT[, TEXT_B] -> LABEL, PROBS "
                   "(fsserve's preprocessing and postprocessing as Python-backend models around the graph) instead of the graph alone")
    p.set_defaults(func=run_export)
    return p


def _name_parts(value: str) -> tuple[str, ...]:
    """Parse --int8-keep-float: comma-separated node-name parts, or 'none' for an explicit empty list."""
    parts = tuple(part for part in value.split(",") if part.strip())
    if parts == ("none",):
        return ()
    if not parts:
        raise argparse.ArgumentTypeError("give node-name parts such as down_proj, or 'none'")
    return parts


def run_export(args: argparse.Namespace) -> int:
    """Run the export command: load, export (validated), optionally write the Triton repository."""
    from fsserve.modeling import MODEL_CONFIG, PromptModel

    check_model_source(args.model_dir, saved=True)
    model_dir = Path(args.model_dir)
    if not (model_dir / MODEL_CONFIG).is_file():
        raise ValueError(f"{model_dir} is not a saved fsserve model (no {MODEL_CONFIG}); train one with `fsserve train` first")
    kwargs: dict[str, Any] = {
        "quantize": args.quantize,
        "fp16": args.fp16,
        "int8_mode": args.int8_mode,
        "per_channel": args.per_channel,
        "int8_nodes": args.int8_nodes,
        "torch_weights": bool(args.with_torch),
        "embedding_bits": args.embedding_bits,
        "embedding_block": args.embedding_block,
        "exact_embedding": not args.no_exact_embedding,
    }
    optional = {"int8_keep_float": args.int8_keep_float, "int8_centred": args.int8_centred, "int8_outliers": args.int8_outliers, "weight_storage": args.weights,
                "optimize": False if args.no_optimize else None, "atol": args.atol}
    kwargs |= {key: value for key, value in optional.items() if value is not None}
    for key, path in (("calibration_texts", args.calibration_file), ("validation_texts", args.validation_file)):
        if path:
            from fsserve.data import load_examples

            kwargs[key] = load_examples(path)
    start = time.perf_counter()
    model = PromptModel.from_pretrained(model_dir)
    bundle = model.export(args.out_dir, format=args.format, **kwargs)
    manifest = json.loads((Path(bundle) / "manifest.json").read_text(encoding="utf-8"))
    summary = {key: manifest.get(key) for key in ("precision", "quantization", "weights", "validation", "agreement_with_fp32", "optimization")}
    size = sum(f.stat().st_size for f in Path(bundle).rglob("*") if f.is_file())
    print(f"wrote bundle {bundle} ({size / 2**20:.0f} MiB) in {time.perf_counter() - start:.1f}s")
    print(json.dumps(summary, indent=2))
    agreement = (manifest.get("agreement_with_fp32") or {}).get("agreement")
    if agreement is not None and agreement < AGREEMENT_FLOOR:
        print(f"WARNING: the stored graph gives the fp32 graph's label on only {100 * agreement:.1f}% of "
              f"{manifest['agreement_with_fp32'].get('on')} (below {100 * AGREEMENT_FLOOR:.0f}%). For answers that match fp32 "
              + ("" if args.calibration_file else "give --calibration-file (the task's training texts) to the per-token recipe, ")
              + ("" if (manifest.get("quantization") or {}).get("centred") else "add --int8-centred (sst-5: 96.2% -> 97.6%, 3-8% slower), ")
              + ("" if (manifest.get("quantization") or {}).get("kept_float") or args.int8_keep_float is not None
                 else "add --int8-keep-float down_proj (sst-5: 97.6% -> 98.85%, ~22% slower), ")
              + "raise --int8-outliers, or trade speed for agreement: export without --quantize (fp32, the same answers) "
              "or with --weights fp16 (half the size, 99.9% on SST-2).", file=sys.stderr)
    if args.triton_repository:
        from fsserve.exporters.triton_repository import export_triton_repository
        from fsserve.exporters.triton_text import export_triton_text_repository

        write = export_triton_text_repository if args.triton_text else export_triton_repository
        target = write(bundle, args.triton_repository, model_name=args.triton_model_name, kind=args.triton_kind, instance_count=args.triton_instances)
        print(f"wrote Triton model repository {target}")
    return 0
