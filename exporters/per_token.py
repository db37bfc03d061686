"""Per-token int8: the CPU recipe that keeps a sensitive decoder's answers and its int8 speed.

onnxruntime's dynamic int8 (``quantize_dynamic``) quantises each MatMul's activations with one
scale for the whole batch tensor. In Gemma a few tokens (the first one above all) and a few channels
carry activations hundreds of times larger than the rest, so that one scale leaves the ordinary
tokens a handful of levels, and a fine-tuned few-shot model changes ~7% of its SST-2 dev labels.
This module rewrites the float graph instead:

- **activations per token**: each row of a MatMul's input gets its own scale (``max |x| / 127``,
  uint8 with zero point 128): the row is divided by its ``max |x|`` and one per-tensor
  ``QuantizeLinear`` (scale 1/127) turns it into levels; the int32 product is rescaled by
  ``MatMulIntegerToFloat`` (weight scales, with the 1/127 folded in) and one ``Mul`` (the row's
  ``max |x|``). ``centred=True`` centres each row on the middle of its range first (scale
  ``(max - min) / 254``) and adds the centre times the weight's column sums back in float, since
  onnxruntime's integer MatMuls take no per-row zero point: finer levels for lopsided rows, at a few
  more nodes per input. Inputs shared by several MatMuls (q/k/v, gate/up) are quantised once;
- **outlier channels in float**: the ``outliers`` input channels with the largest calibrated
  magnitude stay out of the integer product (zeroed before quantisation) and go through a small
  float MatMul instead (LLM.int8()'s decomposition, with the channels fixed at export);
- **weights by GPTQ**: int8 per output channel, each input row rounded in turn with the error
  spread over the rows not yet rounded, weighted by the calibration inputs' second moment
  (Frantar et al., 2023); ``gptq=False`` rounds to nearest.

Calibration runs the float graph itself on onnxruntime over texts the caller gives (the task's
training texts, labels unused; never dev or test), over real tokens only (padding rows excluded).

>>> quantize_per_token("fp32.onnx", "int8.onnx", calibration_batches)  # doctest: +SKIP
{'mode': 'per-token', 'centred': False, 'matmuls': 126, 'points': 72, 'outliers': 32, 'gptq': True, ...}
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

MIN_DIM = 16  # MatMuls with a smaller weight side (the label head: one column per class) stay in float
DEFAULT_OUTLIERS = 32
GPTQ_BLOCK = 128
GPTQ_DAMP = 0.01


def weight_matmuls(model: Any) -> dict[str, list[Any]]:
    """The MatMul nodes whose second input is a 2-D float weight of at least MIN_DIM on each side, by input tensor."""
    from onnx import TensorProto

    inits = {i.name: i for i in model.graph.initializer}
    points: dict[str, list[Any]] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        w = inits[node.input[1]]
        if w.data_type == TensorProto.FLOAT and len(w.dims) == 2 and min(w.dims) >= MIN_DIM:
            points.setdefault(node.input[0], []).append(node)
    return points


def widest_input_matmuls(model: Any) -> list[str]:
    """Names of the weight MatMuls with the widest input: the feed-forward down projections (Gemma/Llama
    ``down_proj``, BERT ``output.dense``, GPT-2 ``mlp.c_proj``), whose heavy-tailed inputs 8 bits serve worst."""
    inits = {i.name: i for i in model.graph.initializer}
    groups = weight_matmuls(model)
    widths = {x: int(inits[nodes[0].input[1]].dims[0]) for x, nodes in groups.items()}
    widest = max(widths.values(), default=0)
    return [node.name for x, nodes in groups.items() if widths[x] == widest for node in nodes]


def calibrate(source: str | Path, batches: Sequence[dict[str, np.ndarray]], points: Sequence[str], hessians: bool = True) -> dict[str, dict[str, Any]]:
    """Run the float graph over the batches; per input tensor: channel max |x| and (for GPTQ) sum of x^T x, over real tokens."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(source))
    known = {o.name for o in model.graph.output}
    for name in points:
        if name not in known:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tapped tensor
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del model
    names = list(points)
    inputs = {i.name for i in sess.get_inputs()}
    stats: dict[str, dict[str, Any]] = {}
    for batch in batches:
        outs = sess.run(names, {k: v for k, v in batch.items() if k in inputs})
        mask = batch.get("attention_mask")  # a graph without one: every row is real
        real = mask.reshape(-1).astype(bool) if mask is not None else None
        for name, x in zip(names, outs):
            rows = x.reshape(-1, x.shape[-1])
            if real is not None and rows.shape[0] == real.shape[0]:
                rows = rows[real]
            rows = rows.astype(np.float64)
            entry = stats.setdefault(name, {"amax": np.zeros(rows.shape[1]), "tokens": 0})
            entry["amax"] = np.maximum(entry["amax"], np.abs(rows).max(axis=0))
            entry["tokens"] += rows.shape[0]
            if hessians:
                entry["h"] = entry.get("h", 0.0) + rows.T @ rows
    return stats


def weight_scales(w: np.ndarray) -> np.ndarray:
    """Per-output-channel symmetric int8 scales of a (K, N) weight (1 where a column is all zero)."""
    scale = np.abs(w).max(axis=0) / 127.0
    return np.where(scale > 0, scale, 1.0)


def round_int8(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Round a (K, N) weight to int8 with per-column scales (round to nearest, clipped to ±127)."""
    return np.clip(np.rint(w / scale), -127, 127).astype(np.int8)


def gptq_int8(w: np.ndarray, h: np.ndarray, damp: float = GPTQ_DAMP, block: int = GPTQ_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Quantise a (K, N) weight to int8 per output channel by GPTQ; ``h`` is the (K, K) sum of x^T x of its inputs."""
    w = np.array(w, dtype=np.float64)
    scale = weight_scales(w)
    k = w.shape[0]
    h = np.array(h, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead, :] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    # Upper Cholesky factor of H^-1: row i holds how row i's rounding error moves the later rows.
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros(w.shape, dtype=np.int8)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = w[b0:b1].copy()
        err = np.zeros_like(wb)
        for i in range(b1 - b0):
            row = wb[i]
            qi = np.clip(np.rint(row / scale), -127, 127)
            q[b0 + i] = qi
            e = (row - qi * scale) / u[b0 + i, b0 + i]
            wb[i:] -= np.outer(u[b0 + i, b0 + i : b1], e)
            err[i] = e
        w[b1:] -= u[b0:b1, b1:].T @ err
    return q, scale


def _const(name: str, value: np.ndarray) -> Any:
    """An initializer from a numpy array."""
    from onnx import numpy_helper

    return numpy_helper.from_array(value, name)


def _quantize_point(x: str, tag: str, k: int, keep: np.ndarray | None, centred: bool) -> tuple[list[Any], list[Any], dict[str, str]]:
    """Nodes that turn input ``x`` (…, K) into uint8 rows with per-row scales (and its float side: outlier columns, centre).

    Each row is divided by its own range first, so one per-tensor ``QuantizeLinear`` (scale 1/127 or
    1/254, zero point 128) quantises every row on its own levels, in ``x``'s own shape: no reshapes,
    and the row range itself is the factor ``_quantized_matmul`` multiplies back (its 1/127 or 1/254
    is folded into the weight scales). Node count matters at batch 1, where onnxruntime spends
    microseconds per node. An all-zero row has range 0: its quantised values are meaningless, but
    its product is multiplied by that 0, so its result is exactly 0 as it should be.
    """
    from onnx import helper

    n = f"pertoken/{tag}/"
    inits: list[Any] = []
    nodes: list[Any] = []
    rows = x
    out: dict[str, str] = {}
    if keep is not None:  # outlier channels: out of the row range (their int8 weights are zero) and through a float MatMul
        mask = np.ones(k, np.float32)
        mask[keep] = 0.0
        inits += [_const(n + "mask", mask), _const(n + "outliers", keep.astype(np.int64))]
        nodes += [
            helper.make_node("Mul", [x, n + "mask"], [n + "xr"], name=n + "Mask"),
            helper.make_node("Gather", [x, n + "outliers"], [n + "xo"], axis=-1, name=n + "Outliers"),
        ]
        rows = n + "xr"
        out["float_in"] = n + "xo"
    if centred:
        # Centre each row on the middle of its range, so the 255 levels span [min, max]; the centre's
        # product with the weight's column sums is added back in float (_quantized_matmul).
        nodes += [
            helper.make_node("ReduceMax", [rows], [n + "max"], axes=[-1], keepdims=1, name=n + "RowMax"),
            helper.make_node("ReduceMin", [rows], [n + "min"], axes=[-1], keepdims=1, name=n + "RowMin"),
            helper.make_node("Sub", [n + "max", n + "min"], [n + "range"], name=n + "Range"),
            helper.make_node("Add", [n + "max", n + "min"], [n + "sum"], name=n + "Sum"),
            helper.make_node("Mul", [n + "sum", "pertoken/half"], [n + "centre"], name=n + "Centre"),
            helper.make_node("Sub", [x, n + "centre"], [n + "shifted"], name=n + "Shift"),
            helper.make_node("Div", [n + "shifted", n + "range"], [n + "unit"], name=n + "Unit"),  # [-1/2, 1/2] -> levels 1..255
            helper.make_node("QuantizeLinear", [n + "unit", "pertoken/inv254", "pertoken/zp"], [n + "xq"], name=n + "Quantize"),
        ]
        if keep is not None:
            nodes.append(helper.make_node("Concat", [n + "xo", n + "centre"], [n + "float_in"], axis=-1, name=n + "FloatIn"))
        out["float_in"] = n + ("float_in" if keep is not None else "centre")
        out["scale"] = n + "range"
    else:  # symmetric: |x| <= max |x| maps to levels 1..255 around 128
        nodes += [
            helper.make_node("Abs", [rows], [n + "abs"], name=n + "Abs"),
            helper.make_node("ReduceMax", [n + "abs"], [n + "amax"], axes=[-1], keepdims=1, name=n + "RowMax"),
            helper.make_node("Div", [x, n + "amax"], [n + "unit"], name=n + "Unit"),  # [-1, 1] (outlier channels saturate: unused)
            helper.make_node("QuantizeLinear", [n + "unit", "pertoken/inv127", "pertoken/zp"], [n + "xq"], name=n + "Quantize"),
        ]
        out["scale"] = n + "amax"
    out["xq"] = n + "xq"
    return nodes, inits, out


def _quantized_matmul(tag: str, output: str, w: np.ndarray, q: np.ndarray, scale: np.ndarray, point: dict[str, str],
                      keep: np.ndarray | None, centred: bool) -> tuple[list[Any], list[Any]]:
    """Nodes that replace one float MatMul: integer product of the quantised rows, rescaled, plus the float side."""
    from onnx import helper

    n = f"pertoken/{tag}/"
    if keep is not None:
        q = q.copy()
        q[keep] = 0
    levels = 254.0 if centred else 127.0  # the row factor is the range (or max |x|), not the step: fold the step in here
    inits = [_const(n + "wq", q), _const(n + "wscale", (scale / levels).astype(np.float32))]
    joined = output
    y = n + "y" if "float_in" in point else joined
    nodes = [
        helper.make_node("MatMulIntegerToFloat", [point["xq"], n + "wq", "pertoken/one", n + "wscale", "pertoken/zp"], [n + "yi"],
                         domain="com.microsoft", name=n + "MatMulIntegerToFloat"),
        helper.make_node("Mul", [n + "yi", point["scale"]], [y], name=n + "RowScale"),
    ]
    if "float_in" in point:  # outlier rows of the weight (exact), then the dequantised weight's column sums (the centre's share)
        parts = [w[keep].astype(np.float64)] if keep is not None else []
        if centred:
            parts.append((q.astype(np.float64) * scale).sum(axis=0, keepdims=True))
        inits.append(_const(n + "wf", np.concatenate(parts, axis=0).astype(np.float32)))
        nodes += [helper.make_node("MatMul", [point["float_in"], n + "wf"], [n + "yf"], name=n + "FloatMatMul"),
                  helper.make_node("Add", [y, n + "yf"], [joined], name=n + "AddFloat")]
    return nodes, inits


def quantize_per_token(source: str | Path, target: str | Path, calibration_batches: Sequence[dict[str, np.ndarray]] | None,
                       outliers: int = DEFAULT_OUTLIERS, gptq: bool = True, centred: bool = False,
                       reuse: dict[str, Any] | None = None, keep_float: Sequence[str] = ()) -> dict[str, Any]:
    """Write the per-token int8 graph of a float graph (see the module doc); return its recipe record.

    ``keep_float``: MatMuls whose node name contains one of these (``down_proj``, ``layers.17/``) stay
    in float, with every MatMul that reads the same input.

    Without calibration batches the recipe falls back to round-to-nearest weights and no outlier
    channels (both need the calibration inputs), and says so in the record. ``reuse``: a dict kept
    between calls on the same graph, batches and outliers; the calibration statistics and rounded
    weights are stored there and reused (they do not depend on ``centred``), so a second variant
    costs only its graph.
    """
    import onnx
    from onnx import helper, numpy_helper

    if outliers < 0:
        raise ValueError(f"outliers must be >= 0, got {outliers}")
    model = onnx.load(str(source))
    groups = weight_matmuls(model)
    if not groups:
        raise ValueError(f"{source} has no float MatMul weights to quantise")
    calibrated = bool(calibration_batches)
    reuse = {} if reuse is None else reuse
    if "stats" not in reuse:
        reuse["stats"] = calibrate(source, calibration_batches, list(groups), hessians=gptq) if calibrated else {}
    stats = reuse["stats"]
    rounded = reuse.setdefault("weights", {})
    inits = {i.name: i for i in model.graph.initializer}
    replaced: dict[str, list[Any]] = {}  # first MatMul's output -> the nodes of its input's block
    new_inits = [_const("pertoken/zp", np.array(128, np.uint8)), _const("pertoken/one", np.array(1.0, np.float32)),
                 _const("pertoken/inv254", np.array(1 / 254.0, np.float32)),
                 _const("pertoken/inv127", np.array(1 / 127.0, np.float32)), _const("pertoken/half", np.array([0.5], np.float32))]
    dropped: set[str] = set()
    matmuls = 0
    kept_float = 0
    for index, (x, nodes) in enumerate(groups.items()):
        if any(part in node.name for node in nodes for part in keep_float):
            kept_float += len(nodes)
            continue
        k = int(inits[nodes[0].input[1]].dims[0])
        st = stats.get(x)
        keep = np.sort(np.argsort(st["amax"])[-outliers:]) if (st is not None and outliers and outliers < k) else None
        point_nodes, point_inits, point = _quantize_point(x, f"p{index}", k, keep, centred)
        new_inits += point_inits
        ws = [numpy_helper.to_array(inits[node.input[1]]).astype(np.float32) for node in nodes]
        w = np.concatenate(ws, axis=1)
        if index in rounded:
            q, scale = rounded[index]
        elif gptq and st is not None:  # one Hessian per input: the side-by-side weights are rounded as one
            h = st["h"]
            if keep is not None:  # the outlier channels are not in the integer product
                h = h.copy()
                h[keep, :] = 0.0
                h[:, keep] = 0.0
            q, scale = gptq_int8(w, h)
        else:
            scale = weight_scales(w)
            q = round_int8(w, scale)
        rounded[index] = (q, scale)
        mm_nodes, start = [], 0
        for j, (node, wj) in enumerate(zip(nodes, ws)):  # one product per MatMul: side by side and split was slower here
            cols = slice(start, start + wj.shape[1])
            start += wj.shape[1]
            part_nodes, part_inits = _quantized_matmul(f"p{index}/m{j}", node.output[0], wj, q[:, cols], scale[cols], point, keep, centred)
            mm_nodes += part_nodes
            new_inits += part_inits
        replaced[nodes[0].output[0]] = point_nodes + mm_nodes
        for node in nodes:
            dropped.add(node.input[1])
        matmuls += len(nodes)
    gone = {node.output[0] for group in groups.values() for node in group if group[0].output[0] in replaced}
    out_nodes = []
    for node in model.graph.node:  # the group's block goes where its first MatMul was; the others disappear
        if node.op_type == "MatMul" and node.output[0] in gone:
            out_nodes += replaced.get(node.output[0], [])
        else:
            out_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(out_nodes)
    still_used = {i for node in out_nodes for i in node.input}
    kept = [i for i in model.graph.initializer if i.name not in dropped or i.name in still_used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + [i for i in new_inits if i.name in still_used])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(target))
    record = {"mode": "per-token", "centred": centred, "matmuls": matmuls, "points": len(groups), "outliers": outliers if calibrated else 0, "kept_float": kept_float,
              "gptq": bool(gptq and calibrated), "calibration_tokens": int(max((s["tokens"] for s in stats.values()), default=0))}
    if not calibrated:
        record["note"] = "no calibration texts: round-to-nearest weights, no outlier channels"
        logger.warning("per-token int8 without calibration texts: round-to-nearest weights and no outlier channels (less faithful)")
    logger.info("per-token int8: %s", record)
    return record
