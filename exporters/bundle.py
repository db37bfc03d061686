"""Writing a bundle: the validated graph, tokenizer, prompt, demonstrations and manifest, in one atomic step.

The bundle's format and its reader live in :mod:`fsserve.bundle` (torch-free); this module is the
writing side, which needs the model (passed in, never imported) and the ONNX exporter.

>>> from fsserve.exporters.bundle import export_bundle
>>> export_bundle(model, "bundles/sst2", quantize="int8")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fsserve.bundle import CONFIG, DEMOS_DIR, TOKENIZER_DIR, TORCH_DIR, BundleTokenizer, tokenizer_record, write_manifest
from fsserve.exporters import onnx as ox
from fsserve.exporters.compact import compact_weights
from fsserve.exporters.per_token import DEFAULT_OUTLIERS, quantize_per_token
from fsserve.utils.atomic import atomic_directory, write_json_atomic

logger = logging.getLogger(__name__)

# The graph's float weights on disk: "fp16" halves the bundle (widened to float32 at load); "fp32" keeps them exact
# (and the input embedding goes to 8 bits only where that is exact: see exact_embedding).
DEFAULT_WEIGHT_STORAGE = "fp32"

# Per-token int8 calibration: at most this many texts calibrate, and a quarter (at most HELD_OUT) is kept
# aside to measure the agreement, in a seeded shuffle so a file sorted by label splits fairly.
MAX_CALIBRATION = 512
HELD_OUT = 256
CALIBRATION_BATCH = 8
CALIBRATION_SEED = 0
# Per-token int8 stores the embedding in 8 bits with a scale per 32 values: on make demo's Gemma a scale
# per row cost 0.46 points of SST-2 dev agreement, per 32 values nothing measurable (+19 MiB).
PER_TOKEN_EMBEDDING_BLOCK = 32
# int8_centred=None (auto): the symmetric per-token graph is kept when it gives fp32's label on at least this
# share of the held-out calibration texts; below, the centred one is built too and the more faithful kept.
CENTRED_FLOOR = 0.99

# Strings the tokenizer adapter must encode exactly as the HF tokenizer does before a bundle is written.
_PROBES = ("x", "A fine film.", " great", "It was terrible!", "naïve café, 3.5/10")


def export_bundle(model: Any, directory: str | Path, format: str = "onnx", **kwargs: Any) -> Path:
    """Write the validated graph and everything the Predictor needs into a bundle folder (see fsserve.bundle)."""
    if format == "tensorrt":
        from fsserve.exporters.tensorrt import require_tensorrt

        require_tensorrt()
        kwargs.setdefault("optimize", False)  # TensorRT cannot run onnxruntime's contrib fusion ops
    elif format != "onnx":
        raise ValueError(f"unknown export format {format!r}: use 'onnx' or 'tensorrt'")
    return write_bundle(model, directory, target=format, **kwargs)


def write_bundle(
    model: Any,
    directory: str | Path,
    target: str = "onnx",
    quantize: str | None = None,
    fp16: bool = False,
    optimize: bool = True,
    validate: bool = True,
    validation_texts: Sequence[Any] | None = None,
    int8_mode: str = "auto",
    per_channel: bool = False,
    exclude_op_types: Sequence[str] = (),
    int8_nodes: Sequence[str] = (),
    torch_weights: bool = False,
    demos: Any = None,
    atol: float | None = None,
    weight_storage: str = DEFAULT_WEIGHT_STORAGE,
    embedding_bits: int | None = None,
    calibration_texts: Sequence[Any] | None = None,
    int8_outliers: int = DEFAULT_OUTLIERS,
    int8_centred: bool | None = None,
    embedding_block: int | None = None,
    int8_keep_float: Sequence[str] | None = None,
    exact_embedding: bool = True,
) -> Path:
    """Export, validate and optimise the graph, then write the whole bundle atomically; return its path.

    ``weight_storage="fp16"`` stores the graph's float weights in half precision (widened to float32
    when the session loads: see fsserve.exporters.compact), ``embedding_bits=8`` the input embedding
    as int8 rows; the agreement of such a graph with the full fp32 one is measured and recorded.
    ``torch_weights`` adds a copy of the torch model (for ``backend="torch"`` on the bundle).
    ``embedding_block``: with ``embedding_bits=8``, one scale per this many values of a row (default: per row).
    ``exact_embedding`` (default) stores the input embedding in 8 bits where that is lossless, as for a
    table dequantised from an 8-bit checkpoint (the embedded Gemma's): the same answers, a smaller bundle.
    ``calibration_texts`` (the task's training texts; labels unused) calibrate the per-token int8
    recipe; a held-out part of them measures its agreement when no ``validation_texts`` are given.
    ``int8_centred=None`` chooses on that held-out part: the symmetric (faster) graph when it keeps
    fp32's label on at least CENTRED_FLOOR of it, else the more faithful of symmetric and centred, and
    below the floor still, of that with the feed-forward down projections in float (slower, see
    ``_per_token``). ``int8_keep_float``: MatMuls (by node-name part) that stay float in every case.
    """
    if quantize not in (None, "int8"):
        raise ValueError(f"unknown quantize {quantize!r}: the only option is 'int8'")
    if quantize and fp16:
        raise ValueError("choose one of quantize='int8' (CPU) and fp16=True (GPU), not both")
    directory = Path(directory)
    if demos is None:
        demos = getattr(model, "demo_index", None)  # a model trained with demonstrations ships its pool
    info: dict[str, Any] = {"model_name": str(getattr(model, "source", None) or model.lm.config.model_type), "target": target, "opset": ox.OPSET}
    with atomic_directory(directory) as tmp, tempfile.TemporaryDirectory(dir=directory.parent, prefix=f".{directory.name}.work.") as work_dir:
        work = Path(work_dir)
        fp32 = work / "fp32.onnx"
        input_names = ox.export_graph(model, fp32)
        info["optimization"] = ox.optimize_graph(fp32, model) if optimize else {"fusions": None}
        if validate:
            info["validation"] = ox.validate_graph(model, fp32, atol=ox.FP32_ATOL if atol is None else atol)
        graph = tmp / ox.GRAPH_FILE
        staged = fp32
        held_out: list[Any] = []
        if quantize:
            staged = work / "int8.onnx"
            onnx_options = bool(int8_nodes or per_channel or exclude_op_types)  # options of onnxruntime's own quantisers
            mode = ("dynamic" if onnx_options else ox.default_int8_mode(model)) if int8_mode == "auto" else int8_mode
            if int8_keep_float is not None and mode != "per-token":
                raise ValueError(f"int8_keep_float belongs to int8_mode 'per-token', not {mode!r} (use int8_nodes to choose what "
                                 "onnxruntime's quantiser quantises)")
            if mode == "per-token" and onnx_options:
                raise ValueError("int8_nodes, per_channel and exclude_op_types belong to int8_mode 'dynamic' or 'weight-only'; "
                                 "per-token quantises every weight MatMul (tune it with int8_outliers)")
            if mode == "per-token":
                calibration, held_out = split_calibration(calibration_texts or [])
                batches = ox.text_batches(model, calibration, CALIBRATION_BATCH) if calibration else None
                info["quantization"] = _per_token(model, fp32, staged, batches, held_out, int8_outliers, int8_centred, work,
                                                  int8_keep_float)
                info["quantization"]["calibration_texts"] = len(calibration)
                if embedding_bits is None:  # the embedding is 2/3 of the weights: 8 bits with a scale per 32 values
                    embedding_bits, embedding_block = 8, embedding_block or PER_TOKEN_EMBEDDING_BLOCK
            else:
                info["quantization"] = ox.quantize_int8(fp32, staged, mode, per_channel, exclude_op_types, int8_nodes)
        elif fp16:
            staged = work / "fp16.onnx"
            ox.convert_fp16(fp32, staged)
        exact = exact_embedding and target != "tensorrt"  # TensorRT builds its own engine from plain float weights
        compacted = not fp16 and (weight_storage != "fp32" or embedding_bits is not None or exact)
        if compacted:
            info["weights"] = compact_weights(staged, graph, weight_storage, embedding_bits, embedding_block, exact_embedding=exact)
        else:
            os.replace(staged, graph)
            info["weights"] = {"storage": "fp16" if fp16 else "fp32", "embedding": None, "changed": False}
        if staged != fp32 or info["weights"]["changed"]:
            if validation_texts is not None:
                batches = ox.text_batches(model, validation_texts)
                measured_on = f"{len(validation_texts)} validation texts"
            elif held_out:
                batches = ox.text_batches(model, held_out)
                measured_on = f"{len(held_out)} held-out calibration texts"
            else:
                batches = [case.batch for case in ox.shape_grid(model) if "right" in case.label]
                measured_on = "random right-padded shape grid"
            info["agreement_with_fp32"] = ox.agreement(fp32, graph, batches) | {"on": measured_on}
            logger.info("agreement of the stored graph with fp32: %s", info["agreement_with_fp32"])
        info["precision"] = quantize or ("fp16" if fp16 else "fp32")
        info["graph"] = ox.GRAPH_FILE
        info["inputs"] = input_names
        model.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        minify_json(tmp / TOKENIZER_DIR / "tokenizer.json")
        _check_adapter(model.tokenizer, tmp / TOKENIZER_DIR, plain=model.method == "finetune")
        config = model.metadata() | {"tokenizer": tokenizer_record(model.tokenizer), "pad_token_id": model.pad_token_id, "inputs": input_names}
        write_json_atomic(tmp / CONFIG, config)
        if torch_weights:
            model.save_pretrained(tmp / TORCH_DIR)
        info["torch"] = TORCH_DIR if torch_weights else None
        if demos is not None:
            # A DemoIndex ships its sentence encoder as ONNX, so the bundle picks demonstrations without torch.
            demos.save(tmp / DEMOS_DIR, onnx_encoder=True) if hasattr(demos, "encoder_name") else demos.save(tmp / DEMOS_DIR)
        info["demos"] = DEMOS_DIR if demos is not None else None
        write_manifest(tmp, info)
    logger.info("wrote bundle %s (%s)", directory, info["precision"])
    return directory


def _per_token(model: Any, fp32: Path, staged: Path, batches: Any, held_out: Sequence[Any], outliers: int, centred: bool | None,
               work: Path, keep_float: Sequence[str] | None = None) -> dict[str, Any]:
    """Quantise per token; in auto mode (``centred=None``) escalate while the held-out agreement is below CENTRED_FLOOR.

    The steps, each kept only when it keeps more of fp32's labels: the symmetric graph; the centred one;
    the better of those with the feed-forward down projections (the widest-input MatMuls) left in float
    (``keep_float=None``; an explicit ``keep_float`` applies to every graph and replaces that step).
    """
    import onnx

    from fsserve.exporters.per_token import widest_input_matmuls

    reuse: dict[str, Any] = {}
    explicit = tuple(keep_float or ())
    record = quantize_per_token(fp32, staged, batches, outliers=outliers, centred=bool(centred), reuse=reuse, keep_float=explicit)
    if centred is not None or not held_out or batches is None:
        return record
    checks = ox.text_batches(model, held_out)
    symmetric = ox.agreement(fp32, staged, checks)["agreement"]
    choice: dict[str, Any] = {"on": f"{len(held_out)} held-out calibration texts", "floor": CENTRED_FLOOR, "symmetric": symmetric}
    best = symmetric

    def try_variant(key: str, file: str, **options: Any) -> None:
        """Build one more graph, measure it on the held-out texts and keep it if it keeps more labels."""
        nonlocal record, best
        other = work / file
        other_record = quantize_per_token(fp32, other, batches, outliers=outliers, reuse=reuse, **options)
        choice[key] = ox.agreement(fp32, other, checks)["agreement"]
        if choice[key] > best:
            os.replace(other, staged)
            record, best = other_record, choice[key]

    if best < CENTRED_FLOOR:
        try_variant("centred", "int8-centred.onnx", centred=True, keep_float=explicit)
    if best < CENTRED_FLOOR and keep_float is None:
        names = widest_input_matmuls(onnx.load(str(fp32), load_external_data=False))
        try_variant("ffn_out_in_float", "int8-float-ffn.onnx", centred=record["centred"], keep_float=names)
    if best != symmetric:
        logger.info("per-token int8: the symmetric graph keeps %.1f%% of held-out labels; kept %s at %.1f%% (%s)", 100 * symmetric,
                    "centred" if record["centred"] else "symmetric", 100 * best,
                    f"{record['kept_float']} MatMuls in float" if record["kept_float"] else "every MatMul int8")
    return record | {"centred_choice": choice}


def minify_json(path: Path) -> None:
    """Rewrite a pretty-printed JSON file (tokenizer.json: 33 MB for Gemma's) without whitespace: 14 MB, same content."""
    import json

    if not path.is_file():
        return
    text = json.dumps(json.loads(path.read_text(encoding="utf-8")), ensure_ascii=False, separators=(",", ":"))
    path.write_text(text, encoding="utf-8")  # inside the bundle's staging folder: made visible atomically with the rest


def split_calibration(texts: Sequence[Any], seed: int = CALIBRATION_SEED) -> tuple[list[Any], list[Any]]:
    """Split calibration texts into (calibrate, held out): a seeded shuffle, a quarter (at most HELD_OUT) held out."""
    import random

    texts = list(texts)
    random.Random(seed).shuffle(texts)
    held = min(HELD_OUT, len(texts) // 4)
    return texts[held : held + MAX_CALIBRATION], texts[:held]


def _check_adapter(tokenizer: Any, folder: Path, plain: bool = False) -> None:
    """Refuse to write a bundle whose tokenizer.json does not reproduce the HF tokenizer.

    ``plain``: also check plain-text encoding (pairs, token types, longest-first truncation), which
    a standard fine-tuned model's bundle uses instead of the prompt.
    """
    adapter = BundleTokenizer.from_folder(folder, tokenizer_record(tokenizer))
    for text in _PROBES:
        for special in (False, True):
            want = list(tokenizer(text, add_special_tokens=special)["input_ids"])
            got = adapter(text, add_special_tokens=special)["input_ids"]
            if want != got:
                raise ValueError(f"tokenizer.json encodes {text!r} as {got}, the model's tokenizer as {want}: this tokenizer cannot be bundled")
    if not plain:
        return
    firsts, seconds = list(_PROBES[1:]), list(reversed(_PROBES[1:]))
    for pair in (None, seconds):
        for max_length in (7, 64):
            kwargs = dict(truncation=True, max_length=max_length, return_token_type_ids=True)
            want = tokenizer(firsts, pair, **kwargs)
            got = adapter(firsts, pair, **kwargs)
            want_types = want.get("token_type_ids") or [[0] * len(ids) for ids in want["input_ids"]]
            if [list(x) for x in want["input_ids"]] != got["input_ids"] or [list(x) for x in want_types] != got["token_type_ids"]:
                raise ValueError(f"tokenizer.json encodes text pairs (max_length {max_length}) unlike the model's tokenizer: "
                                 "this fine-tuned model's tokenizer cannot be bundled")
