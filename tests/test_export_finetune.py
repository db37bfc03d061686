"""Standard fine-tuning (a linear head on CLS / the last token) exports to the same kind of bundle.

The graph has the same inputs and a (B, num_labels) output (B × 1 for regression); the onnx
Predictor encodes the plain text (no template) with the bundle's torch-free tokenizer, exactly as
the torch model does, and predicts what the torch model predicts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fsserve.bundle import BundleTokenizer, tokenizer_record
from fsserve.config import PromptConfig
from fsserve.modeling import PromptModel
from fsserve.predictor import Predictor
from fsserve.prompts.plain import encode_plain

SINGLE = PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"}, max_length=24)
PAIR = PromptConfig("{sent_0} ? {sent_1} Answer: {mask}", {"entailment": "Yes", "not_entailment": "No"}, max_length=24)
REGRESSION = PromptConfig("{sent_0} ? {sent_1} Answer: {mask}", {"0": "No", "1": "Yes"}, max_length=24, regression_range=(0.0, 5.0))
TEXTS = ["a fine film, warm and funny", "dull.", "The plot never comes together and the acting is flat, "
         "the jokes fall flat and the ending is a mess that goes on and on and on for far too long."]
PAIRS = [("A man plays a guitar.", "Someone makes music."), ("The cat sleeps.", "A dog barks loudly at the moon all night long, "
         "waking every neighbour on the street twice.")]


def _finetuned(tiny_lm: Any, arch: str, prompt: PromptConfig) -> PromptModel:
    """A tiny model with a (seeded, untrained) classification head: enough for parity."""
    lm, tokenizer = tiny_lm(arch)
    torch.manual_seed(0)
    model = PromptModel(lm, tokenizer, prompt, method="finetune").eval()
    with torch.no_grad():  # larger head weights, so the two classes' scores differ clearly
        for p in model.head.parameters():
            p.mul_(20)
    return model


@pytest.mark.parametrize("arch,prompt,inputs", [("bert", SINGLE, TEXTS), ("bert", PAIR, PAIRS), ("bert", REGRESSION, PAIRS),
                                                 ("gemma", SINGLE, TEXTS), ("gemma", PAIR, PAIRS)],
                         ids=["bert-single", "bert-pair", "bert-regression", "gemma-single", "gemma-pair"])
def test_finetuned_model_exports_and_the_onnx_predictor_matches_torch(tiny_lm: Any, tmp_path: Path, arch: str,
                                                                     prompt: PromptConfig, inputs: list[Any]) -> None:
    """Bundle → onnx Predictor gives the torch model's probabilities and predictions (pairs, truncation, regression)."""
    model = _finetuned(tiny_lm, arch, prompt)
    path = model.export(tmp_path / "bundle", torch_weights=False)
    config = json.loads((path / "fsserve.json").read_text())
    assert config["method"] == "finetune"
    torch_side = Predictor.from_model(model)
    onnx_side = Predictor.from_pretrained(path, backend="onnx")
    np.testing.assert_allclose(onnx_side.predict_proba(inputs), torch_side.predict_proba(inputs), atol=1e-5)
    assert onnx_side.predict(inputs) == pytest.approx(torch_side.predict(inputs)) if prompt.is_regression \
        else onnx_side.predict(inputs) == torch_side.predict(inputs)
    width = 1 if prompt.is_regression else len(model.labels)
    assert onnx_side.label_logits(inputs).shape == (len(inputs), width)


@pytest.mark.parametrize("arch", ["bert", "roberta", "gpt2", "gemma"])
def test_bundle_tokenizer_encodes_plain_text_like_the_hf_tokenizer(tiny_lm: Any, tmp_path: Path, arch: str) -> None:
    """Pairs, token types and longest-first truncation: the torch-free adapter equals transformers."""
    _, tokenizer = tiny_lm(arch)
    tokenizer.save_pretrained(tmp_path)
    adapter = BundleTokenizer.from_folder(tmp_path, tokenizer_record(tokenizer))
    kind = "mlm" if arch in ("bert", "roberta") else "causal"
    for examples, sentences in ((TEXTS, 1), (PAIRS, 2)):
        for max_length in (6, 12, 128):
            want = encode_plain(tokenizer, examples, sentences, max_length, kind)
            got = encode_plain(adapter, examples, sentences, max_length, kind)
            assert got == want
            assert all(len(e.input_ids) <= max_length for e in got)
            assert all(e.answer_pos == (0 if kind == "mlm" else len(e.input_ids) - 1) for e in got)


def test_plain_encoding_refuses_bad_input(tiny_lm: Any, tmp_path: Path) -> None:
    """Empty text, a missing second sentence, an unknown kind and a bad max_length are ValueErrors."""
    _, tokenizer = tiny_lm("bert")
    with pytest.raises(ValueError, match="empty text"):
        encode_plain(tokenizer, [" "], 1, 16, "mlm")
    with pytest.raises(ValueError, match="needs 2 texts"):
        encode_plain(tokenizer, ["only one"], 2, 16, "mlm")
    with pytest.raises(ValueError, match="kind"):
        encode_plain(tokenizer, ["a"], 1, 16, "seq2seq")
    tokenizer.save_pretrained(tmp_path)
    adapter = BundleTokenizer.from_folder(tmp_path, tokenizer_record(tokenizer))
    with pytest.raises(ValueError, match="max_length"):
        adapter(["a"], truncation=True, max_length=0)
    with pytest.raises(ValueError, match="text pairs"):
        adapter(["a", "b"], ["c"])
