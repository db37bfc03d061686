"""Offline graph passes (fsserve.exporters.passes): shape folding and the GELU fusion keep every answer."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fsserve.config import PromptConfig
from fsserve.exporters import onnx as ox
from fsserve.exporters import passes
from fsserve.modeling import PromptModel

TEXTS = ["A fine film.", "Dull, slow and far too long for what it has to say about anything at all, really.", "Great!",
         "It was not good", "Nothing in it works.", "A small, warm and funny story."]
PROMPT = PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"}, max_length=48)


def _ops(path: Path) -> Counter:
    """Node counts by op type."""
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def _run(path: Path, batch: dict[str, np.ndarray]) -> np.ndarray:
    """The graph's label logits on one batch."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, batch)[0]


@pytest.mark.parametrize("arch", ["gemma", "gpt2", "bert"])
def test_passes_drop_the_shape_arithmetic_and_keep_every_answer(tiny_lm: Any, tmp_path: Path, arch: str) -> None:
    lm, tokenizer = tiny_lm(arch)
    prompt = PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"}, max_length=48)
    model = PromptModel(lm, tokenizer, prompt).eval()
    raw, folded = tmp_path / "raw.onnx", tmp_path / "folded.onnx"
    ox.export_graph(model, raw)
    shutil.copy(raw, folded)
    report = passes.apply_passes(folded, gelu=arch == "gemma")
    before, after = _ops(raw), _ops(folded)
    assert report["shape_folding"]["folded"] > 0 and report["nodes"] == {"before": sum(before.values()), "after": sum(after.values())}
    inputs = [[i.name for i in onnx.load(str(p)).graph.input] for p in (raw, folded)]
    assert inputs[0] == inputs[1]  # pruning never drops an input the bundle feeds
    assert sum(after.values()) < 0.8 * sum(before.values()) and after["Shape"] < before["Shape"]
    if arch == "gemma":  # gelu_pytorch_tanh, one per layer
        assert report["fast_gelu"] == after["FastGelu"] == 2 and after["Tanh"] == 0
    # same logits as the traced graph on every shape of the exporter's grid, padded rows included
    ox.validate_graph(model, folded)
    for side in ("right", "left"):
        for batch in ox.text_batches(model, TEXTS, 4, pad_side=side):
            np.testing.assert_allclose(_run(folded, batch), _run(raw, batch), atol=1e-5)


def test_reshape_and_expand_targets() -> None:
    source = ["batch_size", "sequence_length", 1024]
    assert passes.reshape_target(["batch_size", "sequence_length", -1, 256], source) == [0, 0, -1, 256]
    assert passes.reshape_target(["batch_size", 1, 1, "sequence_length"], ["batch_size", "sequence_length"]) == [0, 1, 1, -1]
    assert passes.reshape_target(["sequence_length", "batch_size", 4], source) is None  # two dims not in place: needs run time
    assert passes.reshape_target(["batch_size", "2*sequence_length", -1], source) is None  # an expression next to a -1
    assert passes.expand_shape(["batch_size", 4, "sequence_length", 256], ["batch_size", 1, "sequence_length", 256]) == [1, 4, 1, 256]
    assert passes.expand_shape(["batch_size", "sequence_length"], [1, "sequence_length"]) is None  # grows a dim only known at run time


def test_a_graph_the_inference_cannot_read_is_left_as_it_is(tiny_lm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lm, tokenizer = tiny_lm("gemma")
    model = PromptModel(lm, tokenizer, PROMPT).eval()
    path = tmp_path / "g.onnx"
    ox.export_graph(model, path)
    before = _ops(path)

    def broken(_model: Any) -> Any:
        raise RuntimeError("unknown op")

    monkeypatch.setattr(passes, "_symbolic", broken)
    report = passes.apply_passes(path, gelu=False)
    assert report["shape_folding"]["folded"] == 0 and "RuntimeError" in report["shape_folding"]["note"]
    assert _ops(path) == before and not list(tmp_path.glob("*.tmp"))
    ox.validate_graph(model, path)
