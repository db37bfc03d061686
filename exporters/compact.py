"""Compact weight storage for a bundle's graph: float16 on disk, widened to float32 when the session loads.

A fp32 graph of Gemma 3 270M is 1.0 GB, two thirds of it the 262k × 640 embedding. Stored compactly:

- every large float32 initializer becomes a float16 initializer followed by a ``Cast`` to float32.
  onnxruntime folds those casts into float32 initializers when it creates the session (constant
  folding, ``ORT_ENABLE_BASIC`` and up), so the graph computes in float32 exactly as before, on
  weights rounded once to float16; nothing changes at run time;
- optionally (``embedding_bits=8``) the input-embedding table is stored as int8 rows with one
  float32 scale per row (symmetric: row / (max |row| / 127)). Its ``Gather`` then reads the int8
  rows of the batch's tokens and scales just those (Gather → Cast → Mul), so the 8-bit table is never
  widened as a whole (onnxruntime keeps ``DequantizeLinear`` unfolded, which would widen all of it
  per call);
- by default (``exact_embedding``) the embedding is stored that way only when it is *exact* there: a
  table dequantised from an 8-bit checkpoint (GGUF ``Q8_0``: 32 values per scale, as the embedded
  Gemma's) lies on such a grid, so int8 rows and their scales (float16 when that holds them exactly)
  give back every float32 value bit for bit, in 27% of the bytes. Answers cannot change.

The agreement of the compact graph with the full one is measured at export (fsserve.exporters.bundle).

>>> compact_weights("fp32.onnx", "model.onnx", embedding_bits=8)  # doctest: +SKIP
{'fp16_initializers': 236, 'kept_fp32': 3, 'embedding': {'name': 'embed_tokens.weight', 'rows': 262144, 'bits': 8}, ...}
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from fsserve.exporters.per_token import round_int8

logger = logging.getLogger(__name__)

WEIGHT_STORAGES = ("fp32", "fp16")
EMBEDDING_BITS = (None, 8)
EXACT_BLOCKS = (32,)  # values per scale of the 8-bit formats checkpoints ship in (GGUF Q8_0); a scale per row is tried too
MIN_ELEMENTS = 1024  # smaller initializers (norm scales, biases, shapes) stay as they are
FP16_MAX = 65504.0


def _embedding_gather(graph: Any, floats: dict[str, Any]) -> tuple[Any, Any] | None:
    """The Gather that looks token ids up in the largest 2-D float initializer (the input embedding), with that initializer."""
    best = None
    for node in graph.node:
        if node.op_type != "Gather" or node.input[0] not in floats or node.input[1] in floats:
            continue
        init = floats[node.input[0]]
        if len(init.dims) == 2 and (best is None or np.prod(init.dims) > np.prod(best[1].dims)):
            best = (node, init)
    if best is None:
        return None
    users = sum(name == best[1].name for node in graph.node for name in node.input)
    if users != 1 or any(a.name == "axis" and a.i != 0 for a in best[0].attribute):
        return None  # shared with another op (e.g. a tied output projection) or not a row lookup: leave it to fp16
    return best


def _block_grid(table: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 8-bit rows of ``table`` with one scale per ``group`` consecutive values: (int8 rows, float32 scales (vocab, groups))."""
    vocab, width = table.shape
    if width % group:
        raise ValueError(f"embedding width {width} is not a multiple of the block size {group}")
    blocks = table.reshape(vocab, width // group, group)
    scale = (np.abs(blocks).max(axis=2) / np.float32(127.0)).astype(np.float32)  # 0 for an all-zero block: 0 * 0 = 0
    divisor = np.where(scale > 0, scale, np.float32(1.0))
    return round_int8(blocks, divisor[:, :, None]).reshape(vocab, width), scale


def exact_grid(table: np.ndarray, blocks: tuple[int, ...] = EXACT_BLOCKS) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(int8 rows, scales, values per scale) that give back ``table`` bit for bit, or None when it is not on such a grid."""
    table = np.asarray(table, dtype=np.float32)
    if table.ndim != 2 or not np.isfinite(table).all():
        return None
    width = table.shape[1]
    for group in dict.fromkeys((*blocks, width)):  # finest first: a per-row grid is rarely exact, a Q8_0 table always at 32
        if width % group:
            continue
        rows, scale = _block_grid(table, group)
        widened = rows.reshape(len(table), width // group, group).astype(np.float32) * scale[:, :, None]
        if np.array_equal(widened.reshape(table.shape), table):
            return rows, scale, group
    return None


def _quantize_embedding(graph: Any, node: Any, name: str, rows: np.ndarray, scale: np.ndarray) -> list[Any]:
    """Replace ``Gather(table, ids)`` by Gather of int8 rows and of their scales, Cast and Mul; return the new initializers.

    ``scale`` is (vocab, groups): one scale per ``width / groups`` consecutive values of a row (one
    group: a scale per row). Scales that float16 holds exactly are stored so and widened after the Gather.
    """
    from onnx import TensorProto, helper, numpy_helper

    vocab, width = rows.shape
    groups = scale.shape[1]
    out = node.output[0]
    ids = node.input[1]
    half = scale.astype(np.float16)
    exact_half = bool(np.array_equal(half.astype(np.float32), scale))
    stored_scale = half if exact_half else scale
    if groups == 1:
        stored_scale = stored_scale[:, 0]
    new_nodes = [
        helper.make_node("Gather", [f"{name}.q8", ids], [f"{out}.q8"], name=f"{node.name}.q8", axis=0),
        helper.make_node("Cast", [f"{out}.q8"], [f"{out}.f32"], name=f"{node.name}.widen", to=TensorProto.FLOAT),
        helper.make_node("Gather", [f"{name}.scale", ids], [f"{out}.scale"], name=f"{node.name}.scale", axis=0),
    ]
    gathered = f"{out}.scale"
    if exact_half:
        new_nodes.append(helper.make_node("Cast", [gathered], [f"{out}.scale32"], name=f"{node.name}.scale_widen", to=TensorProto.FLOAT))
        gathered = f"{out}.scale32"
    if groups == 1:
        extra = [numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{name}.last_axis")]
        new_nodes.append(helper.make_node("Unsqueeze", [gathered, f"{name}.last_axis"], [f"{out}.scale2"], name=f"{node.name}.unsqueeze"))
    else:  # (..., groups) @ (groups, width) of ones per block -> a scale per value, whatever the ids' rank (sums with 0: exact)
        spread = np.kron(np.eye(groups, dtype=np.float32), np.ones((1, width // groups), np.float32))
        extra = [numpy_helper.from_array(spread, f"{name}.spread")]
        new_nodes.append(helper.make_node("MatMul", [gathered, f"{name}.spread"], [f"{out}.scale2"], name=f"{node.name}.spread"))
    new_nodes.append(helper.make_node("Mul", [f"{out}.f32", f"{out}.scale2"], [out], name=f"{node.name}.rescale"))
    position = list(graph.node).index(node)
    graph.node.remove(node)
    for offset, new in enumerate(new_nodes):
        graph.node.insert(position + offset, new)
    return [numpy_helper.from_array(rows, f"{name}.q8"), numpy_helper.from_array(stored_scale, f"{name}.scale")] + extra


def compact_weights(source: str | Path, target: str | Path, storage: str = "fp16", embedding_bits: int | None = None,
                    embedding_block: int | None = None, exact_embedding: bool = False) -> dict[str, Any]:
    """Write ``source`` to ``target`` with compact weight storage; return what was stored how (for the manifest).

    ``exact_embedding``: store the input embedding in 8 bits when that is lossless (see the module's
    docstring); with ``embedding_bits=8`` an exact grid is preferred to the lossy one whenever there is one.
    The record's ``changed`` is False when the target holds the source's weights as they were.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if storage not in WEIGHT_STORAGES:
        raise ValueError(f"unknown weight storage {storage!r}: use one of {', '.join(WEIGHT_STORAGES)}")
    if embedding_bits not in EMBEDDING_BITS:
        raise ValueError(f"embedding_bits must be 8 or None, got {embedding_bits!r}")
    model = onnx.load(str(source))
    graph = model.graph
    floats = {i.name: i for i in graph.initializer if i.data_type == TensorProto.FLOAT}
    record: dict[str, Any] = {"storage": storage, "fp16_initializers": 0, "kept_fp32": 0, "embedding": None}
    added: list[Any] = []
    if embedding_bits == 8 or exact_embedding:
        found = _embedding_gather(graph, floats)
        if found is None:
            if embedding_bits == 8:
                logger.warning("no input-embedding Gather with a table of its own in %s: the embedding is stored like the other weights", source)
        else:
            node, init = found
            table = numpy_helper.to_array(init).astype(np.float32)
            width = table.shape[1]
            grid = exact_grid(table)
            if grid is not None:
                rows, scale, group = grid
                block = None if group == width else group
            elif embedding_bits == 8:
                rows, scale = _block_grid(table, embedding_block or width)
                block = embedding_block
            del table
            if grid is None and embedding_bits != 8:
                logger.info("the input embedding of %s is not on an exact 8-bit grid: stored like the other weights", source)
            else:
                added += _quantize_embedding(graph, node, init.name, rows, scale)
                graph.initializer.remove(init)
                del floats[init.name]
                record["embedding"] = {"name": init.name, "rows": int(init.dims[0]), "bits": 8, "block": block, "exact": grid is not None}
    casts = []
    if storage == "fp16":
        for name, init in list(floats.items()):
            if int(np.prod(init.dims)) < MIN_ELEMENTS:
                continue
            array = numpy_helper.to_array(init)
            if float(np.abs(array).max(initial=0.0)) > FP16_MAX:
                record["kept_fp32"] += 1  # would overflow float16
                continue
            graph.initializer.remove(init)
            added.append(numpy_helper.from_array(array.astype(np.float16), f"{name}.fp16"))
            casts.append(helper.make_node("Cast", [f"{name}.fp16"], [name], name=f"{name}.widen", to=TensorProto.FLOAT))
            record["fp16_initializers"] += 1
    record["changed"] = bool(added)
    if not record["changed"]:  # the source's own bytes: no second serialisation of an unchanged graph
        if Path(source).resolve() != Path(target).resolve():
            shutil.copyfile(source, target)
        return record
    graph.initializer.extend(added)
    for offset, cast in enumerate(casts):  # first in the graph: their inputs are initializers, their outputs feed everything
        graph.node.insert(offset, cast)
    onnx.save(model, str(target))
    logger.info("stored %s compactly: %s", target, record)
    return record
