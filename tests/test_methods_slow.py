"""Adaptation methods, slow: every method × every tiny family through the full exporter, and the real Gemma on SST-2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fsserve.config import PromptConfig, TrainingArguments
from fsserve.data import default_data_dir, get_task, load_kshot
from fsserve.methods import adapt
from fsserve.modeling import PromptModel
from fsserve.predictor import Predictor
from fsserve.prompts import decoder_template
from fsserve.training import Trainer, evaluate_model

pytestmark = pytest.mark.slow

KSHOT = default_data_dir() / "k-shot"  # $FSSERVE_DATA_DIR, else ../shared/data
PROMPT = PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"}, max_length=48)
TEXTS = ["A fine film.", "Dull, slow and far too long.", "Great!"]
OPTIONS = {"probe": {}, "prompt-tuning": {"num_virtual_tokens": 5}, "prefix-tuning": {"num_virtual_tokens": 5, "prefix_hidden": 24}, "lora": {"lora_r": 4}}


@pytest.mark.parametrize("arch", ["bert", "roberta", "gpt2", "gemma"])
@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_every_method_exports_through_the_validating_exporter(tiny_lm: Any, tmp_path: Path, arch: str, method: str) -> None:
    lm, tokenizer = tiny_lm(arch)
    model = adapt(lm, tokenizer, PROMPT, method, config=OPTIONS[method])
    # Move the trainable parts off their initial values, so parity is checked on non-trivial weights.
    torch.manual_seed(0)
    for tensor in model.method_state().values():
        tensor.data.add_(0.05 * torch.randn_like(tensor))
    bundle = model.eval().export(tmp_path / "bundle")  # the exporter's own grid: 3 batch sizes, 4 lengths, both sides
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["validation"]["max_abs_diff"] < 1e-4
    onnx_probs = Predictor.from_pretrained(bundle, backend="onnx").predict_proba(TEXTS)
    torch_probs = Predictor.from_pretrained(bundle, backend="torch").predict_proba(TEXTS)
    np.testing.assert_allclose(onnx_probs, torch_probs, atol=1e-5)
    np.testing.assert_allclose(torch_probs, Predictor.from_model(model).predict_proba(TEXTS), atol=1e-5)


@pytest.mark.skipif(not KSHOT.is_dir(), reason=f"no k-shot data under {KSHOT} (set FSSERVE_DATA_DIR)")
@pytest.mark.parametrize(("method", "lr"), [("lora", 5e-4), ("prefix-tuning", 5e-3), ("prompt-tuning", 3e-2)])
def test_gemma_methods_learn_sst2(method: str, lr: float, tmp_path: Path) -> None:
    task = get_task("SST-2")
    train = load_kshot(task, KSHOT, k=16, seed=42, split="train")
    test = load_kshot(task, KSHOT, k=16, seed=42, split="test")[:100]
    prompt = PromptConfig(decoder_template(task.template), dict(task.label_words), labels=list(task.labels))
    model = PromptModel.from_pretrained("embedded", prompt=prompt, method=method)
    before = evaluate_model(model, test, task.metric)["score"]
    args = TrainingArguments(method=method, max_steps=30, eval_steps=30, learning_rate=lr, seed=42, progress=False)
    Trainer(model, args, train, metric=task.metric).train()
    after = evaluate_model(model, test, task.metric)["score"]
    assert after > before, f"{method}: {before:.3f} -> {after:.3f}"
    model.save_pretrained(tmp_path / "m")
    loaded = PromptModel.from_pretrained(tmp_path / "m")
    np.testing.assert_allclose(loaded.predict_logits(TEXTS).numpy(), model.predict_logits(TEXTS).numpy(), atol=1e-5)
