"""The ONNX graph of the label logits: export, validation against torch, fusions, int8 and fp16.

The graph computes exactly ``PromptModel.forward``: inputs ``input_ids``, ``attention_mask``,
``answer_pos`` (and ``token_type_ids`` where the model uses them), one output ``label_logits``
(``batch_size`` × num_labels). The hidden state is gathered at the answer position and multiplied
by the label words' rows only (after the MLM transform for encoders), so B × seq × vocab logits are
never formed; a decoder's position ids are computed from the attention mask inside the graph.

We trace with the TorchScript exporter (``dynamo=False``): ``torch.export`` refuses the label
head's data-dependent check, and tracing freezes that check as the constant it is for one model.
Tracing can also freeze shape-dependent Python branches, which is why every export is validated
against torch on a grid of batch sizes, lengths and both padding sides, and fails loudly if the
graph disagrees.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

OPSET = 17
GRAPH_FILE = "model.onnx"
OUTPUT_NAME = "label_logits"
BATCH_SIZES = (1, 3, 8)
FP32_ATOL = 1e-4
# Offline fusions of onnxruntime's transformer optimizer, by HF model type; others get runtime fusions only.
FUSION_MODEL_TYPES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert", "electra": "bert", "gpt2": "gpt2"}


class ExportValidationError(RuntimeError):
    """The exported graph disagrees with the torch model (raised, never logged and ignored)."""


class LabelLogitsGraph(nn.Module):
    """The traced function: positional inputs in the graph's order, one tensor out.

    >>> graph = LabelLogitsGraph(model)  # doctest: +SKIP
    >>> graph.input_names
    ['input_ids', 'attention_mask', 'answer_pos', 'token_type_ids']
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.input_names = ["input_ids", "attention_mask", "answer_pos"] + (["token_type_ids"] if model.uses_token_types else [])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_pos: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Return (B, num_labels) label logits, as PromptModel.forward does."""
        return self.model(input_ids, attention_mask, answer_pos, token_type_ids)


@dataclass
class ShapeCase:
    """One validation batch: padded int64 inputs plus where they came from (for error messages)."""

    batch: dict[str, np.ndarray]
    label: str


def shape_grid(model: Any, batch_sizes: Sequence[int] = BATCH_SIZES, lengths: Sequence[int] | None = None, seed: int = 0) -> Iterator[ShapeCase]:
    """Fresh random batches over batch sizes, widths from 5 to max_length and both padding sides."""
    rng = np.random.default_rng(seed)
    max_len = int(model.prompt_config.max_length)
    if lengths is None:
        lengths = sorted({5, min(13, max_len), min(37, max_len), max_len})
    vocab = int(model.lm.get_input_embeddings().num_embeddings)
    per_example = int(getattr(model, "rows_per_example", 1))  # a prompt ensemble reads P rows per example
    for size in batch_sizes:
        size *= per_example
        for width in lengths:
            for side in ("right", "left"):
                rows = rng.integers(min(5, width), width + 1, size=size)
                rows[0] = width  # one full row, so the batch really has this width
                yield ShapeCase(_random_batch(model, rng, rows, width, side, vocab), f"batch {size}, length {width}, {side} padding")


def _random_batch(model: Any, rng: np.random.Generator, rows: np.ndarray, width: int, side: str, vocab: int) -> dict[str, np.ndarray]:
    """Random ids with the given row lengths; the answer is the last token (decoders) or anywhere (encoders)."""
    size = len(rows)
    ids = np.full((size, width), model.pad_token_id, dtype=np.int64)
    mask = np.zeros((size, width), dtype=np.int64)
    types = np.zeros((size, width), dtype=np.int64)
    answer = np.empty(size, dtype=np.int64)
    for i, n in enumerate(rows):
        start = 0 if side == "right" else width - n
        ids[i, start : start + n] = rng.integers(0, vocab, size=n)
        mask[i, start : start + n] = 1
        types[i, start + n // 2 : start + n] = 1
        answer[i] = start + (n - 1 if model.kind == "causal" else int(rng.integers(0, n)))
    batch = {"input_ids": ids, "attention_mask": mask, "answer_pos": answer}
    if model.uses_token_types:
        batch["token_type_ids"] = types
    return batch


@torch.no_grad()
def torch_label_logits(model: Any, batch: dict[str, np.ndarray]) -> np.ndarray:
    """The torch reference for one numpy batch, on the model's device."""
    device = next(model.parameters()).device
    tensors = {k: torch.as_tensor(v, device=device) for k, v in batch.items()}
    return model(**tensors).float().cpu().numpy()


def export_graph(model: Any, path: str | Path, opset: int = OPSET) -> list[str]:
    """Trace the model's label logits into an ONNX file with named dynamic axes; return the input names."""
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise ValueError(f"export needs a float32 model (got {dtype}); load it with torch_dtype=torch.float32 and pass fp16=True for a half graph")
    graph = LabelLogitsGraph(model).eval()
    # An odd width with uneven rows, longer than tiny sliding windows, so no shape coincides with a constant.
    rng = np.random.default_rng(1)
    width = min(int(model.prompt_config.max_length), 19)
    rows = np.repeat([width, max(5, width - 7)], int(getattr(model, "rows_per_example", 1)))
    example = _random_batch(model, rng, rows, width, "right", 100)
    device = next(model.parameters()).device
    args = tuple(torch.as_tensor(example[name], device=device) for name in graph.input_names)
    axes = {name: {0: "batch_size", 1: "sequence_length"} for name in graph.input_names if name != "answer_pos"}
    axes["answer_pos"] = {0: "batch_size"}
    axes[OUTPUT_NAME] = {0: "batch_size"}
    was_training, config = model.training, model.lm.config
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    config.use_cache = False  # a KV cache would only add dead outputs to the traced graph
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Tracer warnings flag frozen Python branches; the validation grid is what guards against them.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                graph, args, str(path), dynamo=False, input_names=graph.input_names, output_names=[OUTPUT_NAME],
                dynamic_axes=axes, opset_version=opset, do_constant_folding=True,
            )
    finally:
        model.train(was_training)
        config.use_cache = use_cache
    logger.info("exported %s (opset %d) to %s", type(model.lm).__name__, opset, path)
    return graph.input_names


def session(path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",)) -> Any:
    """An onnxruntime session with full graph optimisation, for validation inside the exporter."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=list(providers))


def validate_graph(model: Any, path: str | Path, atol: float = FP32_ATOL, batch_sizes: Sequence[int] = BATCH_SIZES, lengths: Sequence[int] | None = None) -> dict[str, Any]:
    """Compare the graph with torch on the shape grid; raise ExportValidationError naming the first failing case."""
    sess = session(path)
    worst, cases = 0.0, 0
    for case in shape_grid(model, batch_sizes, lengths):
        expected = torch_label_logits(model, case.batch)
        got = sess.run([OUTPUT_NAME], case.batch)[0]
        if got.shape != expected.shape:
            raise ExportValidationError(f"{path}: output shape {got.shape} != torch {expected.shape} ({case.label})")
        diff = float(np.abs(got.astype(np.float64) - expected).max())
        # 1e-4 absolute for logits of order one; for a deep LM whose label logits run to tens (Gemma 3),
        # float32 rounding alone exceeds that, so the bound grows with the logits' magnitude.
        allowed = atol * max(1.0, float(np.abs(expected).max()))
        worst, cases = max(worst, diff), cases + 1
        if not diff < allowed:
            raise ExportValidationError(f"{path}: max abs difference {diff:.3g} >= {allowed:.3g} against torch ({case.label})")
        if not np.array_equal(got.argmax(-1), expected.argmax(-1)):
            raise ExportValidationError(f"{path}: argmax differs from torch ({case.label})")
    logger.info("validated %s on %d shapes: max abs diff %.3g", path, cases, worst)
    return {"cases": cases, "max_abs_diff": worst, "atol": atol}


def optimize_graph(path: str | Path, model: Any) -> dict[str, Any]:
    """Apply onnxruntime's transformer fusions where the family has them, then fold shapes (and fuse GELU); report which."""
    from fsserve.exporters.passes import apply_passes

    family = FUSION_MODEL_TYPES.get(model.lm.config.model_type)
    if family is None:
        report: dict[str, Any] = {"fusions": None, "note": f"no offline attention fusions for {model.lm.config.model_type}; onnxruntime fuses at session start"}
    else:
        from onnxruntime.transformers.optimizer import optimize_model

        cfg = model.lm.config
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 0)
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)
        optimized = optimize_model(str(path), model_type=family, num_heads=int(heads), hidden_size=int(hidden))
        stats = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
        optimized.save_model_to_file(str(path))
        report = {"fusions": stats, "model_type": family}
    return report | apply_passes(path, gelu=family is None)  # the offline optimizer fuses GELU itself


def default_int8_mode(model: Any) -> str:
    """Pick the int8 scheme for ``int8_mode="auto"``: per-token, int8 arithmetic that keeps a sensitive model's answers.

    Measured on the embedded Gemma 3 270M fine-tuned on SST-2 (agreement = same label as fp32 on the
    872 dev sentences; benchmarks/RESULTS.md has the tables): onnxruntime's dynamic int8 (one
    activation scale per batch tensor) agrees on 93.2% at 7.9x plain transformers (batch 1); per-token
    (fsserve.exporters.per_token: a scale per token, GPTQ weights, 32 outlier channels in float,
    calibrated on 384 SST-2 training texts) on 99.20% at 4.97x (batch 1) / 4.96x (batch 32).
    Without calibration texts per-token rounds to nearest and agrees on ~98%. ``dynamic`` stays available
    for the last bit of speed; weight-only (MatMulNBits) is slower than fp32 on this CPU.
    """
    return "per-token"


def quantize_int8(source: str | Path, target: str | Path, mode: str = "dynamic", per_channel: bool = False,
                  exclude_op_types: Sequence[str] = (), only_nodes: Sequence[str] = ()) -> dict[str, Any]:
    """Write an int8 graph: ``dynamic`` (QInt8 weights, activations quantised at run time) or ``weight-only`` (int8 weights, float activations).

    ``only_nodes``: quantise only the MatMul/Gemm nodes whose name contains one of these strings
    (e.g. ``("down_proj",)``), leaving the rest (and the embedding) in fp32: the knob that trades
    speed for agreement on a model whose other projections are sensitive (see :func:`default_int8_mode`).
    """
    excluded_nodes = _nodes_outside(source, only_nodes) if only_nodes else []
    if mode == "dynamic":
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        ops = [op for op in ("MatMul", "Gemm", "Gather", "Attention") if op not in set(exclude_op_types)]
        # Fused contrib ops defeat shape inference; their outputs are float tensors.
        extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
        quantize_dynamic(str(source), str(target), op_types_to_quantize=ops, per_channel=per_channel, weight_type=QuantType.QInt8,
                         extra_options=extra, nodes_to_exclude=excluded_nodes)
    elif mode == "weight-only":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=8, block_size=32, is_symmetric=True, nodes_to_exclude=excluded_nodes)
        quantizer.process()
        quantizer.model.save_model_to_file(str(target))
    else:
        raise ValueError(f"unknown int8 mode {mode!r}: use 'dynamic' or 'weight-only'")
    record: dict[str, Any] = {"mode": mode, "per_channel": per_channel, "excluded": list(exclude_op_types)}
    if only_nodes:
        record["only_nodes"] = list(only_nodes)
    return record


def _nodes_outside(source: str | Path, patterns: Sequence[str]) -> list[str]:
    """Names of the graph's MatMul/Gemm/Gather nodes that match none of the patterns (refused if none match)."""
    import onnx

    nodes = [n for n in onnx.load(str(source), load_external_data=False).graph.node if n.op_type in ("MatMul", "Gemm", "Gather")]
    chosen = [n.name for n in nodes if n.op_type != "Gather" and any(p in n.name for p in patterns)]
    if not chosen:
        raise ValueError(f"no MatMul/Gemm node of {source} has a name containing any of {list(patterns)}")
    return [n.name for n in nodes if n.name not in set(chosen)]


def convert_fp16(source: str | Path, target: str | Path) -> None:
    """Write a half-precision graph with float32 inputs/outputs kept (for GPUs)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    half = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(half, str(target))


def agreement(reference: str | Path, candidate: str | Path, batches: Sequence[dict[str, np.ndarray]]) -> dict[str, Any]:
    """How often two graphs predict the same label, and their largest logit gap, over the same batches."""
    ref_sess, cand_sess = session(reference), session(candidate)
    same = total = 0
    worst = 0.0
    for batch in batches:
        a = ref_sess.run([OUTPUT_NAME], batch)[0]
        b = cand_sess.run([OUTPUT_NAME], batch)[0]
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(a)
        worst = max(worst, float(np.abs(a - b).max()))
    return {"agreement": same / max(total, 1), "examples": total, "max_abs_diff": worst}


def text_batches(model: Any, texts: Sequence[Any], batch_size: int = 32, pad_side: str = "right") -> list[dict[str, np.ndarray]]:
    """Encode a validation set the way the Predictor does (sorted by length, then padded)."""
    encoded = model.encode(texts)
    encoded = sorted(encoded, key=lambda e: len(e.input_ids))
    out = []
    for start in range(0, len(encoded), batch_size):
        batch = model.collate(encoded[start : start + batch_size], pad_side=pad_side)
        out.append({k: v.numpy() for k, v in batch.items()})
    return out
