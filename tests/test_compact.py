"""Compact weight storage: fp16 on disk (folded back to fp32 by onnxruntime), int8 embedding rows; bundles shrink, answers hold."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fsserve.config import PromptConfig
from fsserve.exporters.compact import compact_weights
from fsserve.modeling import PromptModel
from fsserve.predictor import Predictor
from fsserve.runtime.onnx import OnnxBackend

PROMPT = PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"}, max_length=48)
TEXTS = ["a fine film, warm and funny", "dull.", "The plot never comes together and the acting is flat.", "An hour too long, but it earns it."]


def _toy_graph(path: Path, shared_table: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """ids → Gather(E) → MatMul(W) (+ a second use of E when ``shared_table``); returns (E, W)."""
    rng = np.random.default_rng(0)
    table = rng.normal(size=(50, 40)).astype(np.float32) * np.linspace(0.1, 3, 50, dtype=np.float32)[:, None]
    weight = rng.normal(size=(40, 48)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["x"], name="embed"), helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 48])]
    if shared_table:
        nodes.append(helper.make_node("ReduceSum", ["E"], ["s"], name="uses_table_too", keepdims=0))
        outputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, [40]))
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])], outputs,
                              [numpy_helper.from_array(table, "E"), numpy_helper.from_array(weight, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return table, weight


def _run(path: Path, ids: np.ndarray) -> np.ndarray:
    """The graph's first output under onnxruntime, full optimisation (as the backend creates sessions)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]


def test_fp16_storage_computes_fp32_on_weights_rounded_once(tmp_path: Path) -> None:
    table, weight = _toy_graph(tmp_path / "full.onnx")
    record = compact_weights(tmp_path / "full.onnx", tmp_path / "half.onnx", "fp16")
    assert record["fp16_initializers"] == 2 and record["embedding"] is None
    ids = np.array([0, 7, 49, 7])
    expected = table.astype(np.float16).astype(np.float32)[ids] @ weight.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(_run(tmp_path / "half.onnx", ids), expected, rtol=1e-5, atol=1e-5)
    stored = {i.name: i.data_type for i in onnx.load(str(tmp_path / "half.onnx")).graph.initializer}
    assert stored == {"E.fp16": TensorProto.FLOAT16, "W.fp16": TensorProto.FLOAT16}
    assert os.path.getsize(tmp_path / "half.onnx") < 0.55 * os.path.getsize(tmp_path / "full.onnx")


def test_int8_embedding_rows_scale_per_row(tmp_path: Path) -> None:
    table, weight = _toy_graph(tmp_path / "full.onnx")
    record = compact_weights(tmp_path / "full.onnx", tmp_path / "q8.onnx", "fp16", embedding_bits=8)
    assert record["embedding"] == {"name": "E", "rows": 50, "bits": 8, "block": None, "exact": False}
    scale = np.abs(table).max(axis=1) / 127
    rows = np.round(table / scale[:, None]).astype(np.int8).astype(np.float32) * scale[:, None]
    ids = np.array([3, 0, 49])
    np.testing.assert_allclose(_run(tmp_path / "q8.onnx", ids), rows[ids] @ weight.astype(np.float16).astype(np.float32), rtol=1e-4, atol=1e-4)
    stored = {i.name: i.data_type for i in onnx.load(str(tmp_path / "q8.onnx")).graph.initializer}
    assert stored["E.q8"] == TensorProto.INT8 and stored["E.scale"] == TensorProto.FLOAT and "E" not in stored


def test_int8_embedding_with_a_scale_per_block_is_finer_than_per_row(tmp_path: Path) -> None:
    table, weight = _toy_graph(tmp_path / "full.onnx")
    table[:, 3] *= 40  # an outlier column: one scale per row leaves the other values few levels
    onnx_model = onnx.load(str(tmp_path / "full.onnx"))
    onnx_model.graph.initializer[0].CopyFrom(numpy_helper.from_array(table, "E"))
    onnx.save(onnx_model, str(tmp_path / "full.onnx"))
    record = compact_weights(tmp_path / "full.onnx", tmp_path / "b8.onnx", "fp32", embedding_bits=8, embedding_block=8)
    compact_weights(tmp_path / "full.onnx", tmp_path / "r8.onnx", "fp32", embedding_bits=8)
    assert record["embedding"]["block"] == 8
    blocks = table.reshape(50, 5, 8)
    scale = np.abs(blocks).max(axis=2, keepdims=True) / 127
    rows = (np.round(blocks / scale) * scale).reshape(50, 40)
    ids = np.array([3, 0, 49, 3])
    np.testing.assert_allclose(_run(tmp_path / "b8.onnx", ids), rows[ids] @ weight, rtol=1e-4, atol=1e-3)
    exact = table[ids] @ weight
    assert np.abs(_run(tmp_path / "b8.onnx", ids) - exact).max() < 0.5 * np.abs(_run(tmp_path / "r8.onnx", ids) - exact).max()
    with pytest.raises(ValueError, match="not a multiple of the block size 7"):
        compact_weights(tmp_path / "full.onnx", tmp_path / "x.onnx", "fp32", embedding_bits=8, embedding_block=7)


def _on_q8_0_grid(table: np.ndarray, block: int = 32) -> np.ndarray:
    """``table`` as a GGUF Q8_0 checkpoint dequantises it: int8 values times a float16 scale per ``block`` values."""
    vocab, width = table.shape
    blocks = table.reshape(vocab, width // block, block)
    scale = (np.abs(blocks).max(axis=2) / 127).astype(np.float16).astype(np.float32)
    divisor = np.where(scale > 0, scale, 1)[:, :, None]
    return (np.clip(np.round(blocks / divisor), -127, 127) * scale[:, :, None]).astype(np.float32).reshape(vocab, width)


def _with_table(path: Path, table: np.ndarray) -> None:
    """Replace the toy graph's embedding table in place."""
    onnx_model = onnx.load(str(path))
    onnx_model.graph.initializer[0].CopyFrom(numpy_helper.from_array(table, "E"))
    onnx.save(onnx_model, str(path))


def test_a_table_on_an_8_bit_grid_is_stored_in_8_bits_bit_for_bit(tmp_path: Path) -> None:
    table, weight = _toy_graph(tmp_path / "full.onnx")
    rng = np.random.default_rng(1)
    grid = _on_q8_0_grid(rng.normal(size=(50, 64)).astype(np.float32) * np.float32(0.05))
    grid[4] = 0.0  # an all-zero row stays zero
    onnx_model = onnx.load(str(tmp_path / "full.onnx"))
    onnx_model.graph.initializer[1].CopyFrom(numpy_helper.from_array(rng.normal(size=(64, 48)).astype(np.float32), "W"))
    onnx.save(onnx_model, str(tmp_path / "full.onnx"))
    _with_table(tmp_path / "full.onnx", grid)
    record = compact_weights(tmp_path / "full.onnx", tmp_path / "exact.onnx", "fp32", exact_embedding=True)
    assert record["embedding"] == {"name": "E", "rows": 50, "bits": 8, "block": 32, "exact": True} and record["changed"]
    ids = np.array([0, 4, 49, 7, 7])
    assert np.array_equal(_run(tmp_path / "exact.onnx", ids), _run(tmp_path / "full.onnx", ids))  # bit for bit, not close
    stored = {i.name: i for i in onnx.load(str(tmp_path / "exact.onnx")).graph.initializer}
    assert stored["E.q8"].data_type == TensorProto.INT8 and stored["E.scale"].data_type == TensorProto.FLOAT16  # Q8_0 scales are fp16
    assert list(stored["E.scale"].dims) == [50, 2] and "E" not in stored
    # asked for 8 bits with a coarser (lossy) layout, the exact grid still wins
    assert compact_weights(tmp_path / "full.onnx", tmp_path / "q8.onnx", "fp32", embedding_bits=8)["embedding"]["exact"]
    assert np.array_equal(_run(tmp_path / "q8.onnx", ids), _run(tmp_path / "full.onnx", ids))


def test_a_table_off_any_grid_is_left_alone_and_one_ulp_is_enough_to_tell(tmp_path: Path) -> None:
    from fsserve.exporters.compact import exact_grid

    _toy_graph(tmp_path / "full.onnx")  # normal floats: on no 8-bit grid
    record = compact_weights(tmp_path / "full.onnx", tmp_path / "same.onnx", "fp32", exact_embedding=True)
    assert record["embedding"] is None and not record["changed"]
    ids = np.array([1, 2, 3])
    assert np.array_equal(_run(tmp_path / "same.onnx", ids), _run(tmp_path / "full.onnx", ids))
    grid = _on_q8_0_grid(np.random.default_rng(2).normal(size=(4, 64)).astype(np.float32))
    assert exact_grid(grid)[2] == 32
    grid[3, 5] = np.nextafter(grid[3, 5], np.float32(np.inf))  # one value one ulp off its grid
    assert exact_grid(grid) is None
    assert exact_grid(np.full((2, 32), np.nan, np.float32)) is None


def test_a_table_other_ops_read_is_not_cut_to_8_bits(tmp_path: Path) -> None:
    _toy_graph(tmp_path / "full.onnx", shared_table=True)
    record = compact_weights(tmp_path / "full.onnx", tmp_path / "q8.onnx", "fp16", embedding_bits=8)
    assert record["embedding"] is None and record["fp16_initializers"] == 2


def test_bad_storage_options_are_refused(tmp_path: Path) -> None:
    _toy_graph(tmp_path / "full.onnx")
    with pytest.raises(ValueError, match="unknown weight storage 'int4'"):
        compact_weights(tmp_path / "full.onnx", tmp_path / "x.onnx", "int4")
    with pytest.raises(ValueError, match="embedding_bits must be 8 or None"):
        compact_weights(tmp_path / "full.onnx", tmp_path / "x.onnx", "fp16", embedding_bits=4)


@pytest.mark.parametrize("arch", ["bert", "gemma"])
def test_a_compact_bundle_is_smaller_and_keeps_its_answers(tiny_lm: Any, arch: str, tmp_path: Path) -> None:
    lm, tokenizer = tiny_lm(arch)
    model = PromptModel(lm, tokenizer, PROMPT).eval()
    full = model.export(tmp_path / "full", optimize=False)
    compact = model.export(tmp_path / "compact", optimize=False, weight_storage="fp16", embedding_bits=8, validation_texts=TEXTS * 4)
    manifest = json.loads((compact / "manifest.json").read_text())
    assert manifest["weights"]["storage"] == "fp16" and manifest["weights"]["embedding"]["bits"] == 8
    assert manifest["agreement_with_fp32"]["examples"] == 16 and not (compact / "torch").exists()
    assert os.path.getsize(compact / "model.onnx") < 0.4 * os.path.getsize(full / "model.onnx")
    # agreement recomputed here, not read from the manifest: both graphs on the same inputs
    reference = Predictor.from_pretrained(full, backend="onnx").label_logits(TEXTS)
    got = Predictor.from_pretrained(compact, backend="onnx").label_logits(TEXTS)
    np.testing.assert_allclose(got, reference, atol=2e-2)
    assert (got.argmax(-1) == reference.argmax(-1)).all()
    backend = OnnxBackend(compact / "model.onnx")
    assert backend.input_names[:3] == ["input_ids", "attention_mask", "answer_pos"]


def test_the_default_export_stores_a_q8_0_embedding_exactly_and_the_tokenizer_minified(tiny_lm: Any, tmp_path: Path) -> None:
    import torch

    lm, tokenizer = tiny_lm("gemma")
    with torch.no_grad():  # as the embedded Gemma's table, dequantised from its GGUF checkpoint
        table = lm.get_input_embeddings().weight
        table.copy_(torch.from_numpy(_on_q8_0_grid(table.numpy())))
    model = PromptModel(lm, tokenizer, PROMPT).eval()
    plain = model.export(tmp_path / "plain", optimize=False, exact_embedding=False)
    exact = model.export(tmp_path / "exact", optimize=False)
    manifest = json.loads((exact / "manifest.json").read_text())
    assert manifest["weights"]["storage"] == "fp32" and manifest["weights"]["embedding"]["exact"] is True
    assert manifest["agreement_with_fp32"]["agreement"] == 1.0 and manifest["agreement_with_fp32"]["max_abs_diff"] == 0.0
    assert json.loads((plain / "manifest.json").read_text())["weights"]["embedding"] is None
    assert os.path.getsize(exact / "model.onnx") < 0.4 * os.path.getsize(plain / "model.onnx")
    texts = TEXTS + ["naïve café, 3.5/10", "x"]
    assert np.array_equal(Predictor.from_pretrained(exact, backend="onnx").label_logits(texts),
                          Predictor.from_pretrained(plain, backend="onnx").label_logits(texts))
    # the tokenizer file is the library's own content without the pretty-printing
    tokenizer.save_pretrained(tmp_path / "hf")
    stored = (exact / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8")
    original = (tmp_path / "hf" / "tokenizer.json").read_text(encoding="utf-8")
    assert "\n" not in stored and len(stored) < 0.6 * len(original) and json.loads(stored) == json.loads(original)


def test_cli_export_stores_the_exact_embedding_unless_told_not_to(tiny_lm: Any, tmp_path: Path) -> None:
    import torch

    from fsserve.cli import main

    lm, tokenizer = tiny_lm("gemma")
    with torch.no_grad():
        table = lm.get_input_embeddings().weight
        table.copy_(torch.from_numpy(_on_q8_0_grid(table.numpy())))
    PromptModel(lm, tokenizer, PROMPT).eval().save_pretrained(tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "small"), "--no-optimize"]) == 0
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "full"), "--no-optimize", "--no-exact-embedding"]) == 0
    weights = {name: json.loads((tmp_path / name / "manifest.json").read_text())["weights"] for name in ("small", "full")}
    assert weights["small"]["embedding"]["exact"] is True and weights["full"]["embedding"] is None
    assert os.path.getsize(tmp_path / "small" / "model.onnx") < 0.4 * os.path.getsize(tmp_path / "full" / "model.onnx")
