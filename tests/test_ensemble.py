"""Prompt ensembles: the mean of the members' logits, joint or separate LMs, training, saving, one exported bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fsserve.config import PromptConfig, TrainingArguments
from fsserve.data import Example
from fsserve.modeling import PromptModel
from fsserve.predictor import Predictor
from fsserve.search.ensemble import PromptEnsemble
from fsserve.training import Trainer

TEXTS = ["A fine film.", "Dull, slow and far too long for what it has to say about anything at all.", "Great!", "It was not good", "Meh."]
PROMPTS = [
    PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"}, max_length=40),
    PromptConfig("{sent_0} A {mask} one", {"0": ["bad", "awful"], "1": "good"}, max_length=32),
]


def _members(tiny_lm: Any, arch: str, shared: bool) -> list[PromptModel]:
    """Two single-prompt models over one LM (shared) or over two different LMs (separate)."""
    lm, tokenizer = tiny_lm(arch)
    first = PromptModel(lm, tokenizer, PROMPTS[0])
    if shared:
        return [first, PromptModel(lm, tokenizer, PROMPTS[1])]
    other, _ = tiny_lm(arch)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return [first, PromptModel(other, tokenizer, PROMPTS[1])]


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("shared", [True, False], ids=["joint-lm", "separate-lms"])
def test_ensemble_logits_are_the_mean_of_the_members(tiny_lm: Any, arch: str, shared: bool) -> None:
    members = _members(tiny_lm, arch, shared)
    ensemble = PromptEnsemble(members)
    assert ensemble.shared_lm is shared
    expected = torch.stack([m.predict_logits(TEXTS) for m in members]).mean(0)
    torch.testing.assert_close(ensemble.predict_logits(TEXTS, batch_size=2), expected, atol=1e-5, rtol=1e-5)
    probs = Predictor.from_model(members[0]).predict_proba(TEXTS)  # single prompts differ from the ensemble
    assert not np.allclose(probs, ensemble.predict_proba(TEXTS).numpy(), atol=1e-4)


def test_log_prob_combination_averages_log_softmax(tiny_lm: Any) -> None:
    members = _members(tiny_lm, "bert", shared=True)
    ensemble = PromptEnsemble(members, combine="log_probs")
    expected = torch.stack([torch.log_softmax(m.predict_logits(TEXTS), -1) for m in members]).mean(0)
    torch.testing.assert_close(ensemble.predict_logits(TEXTS), expected, atol=1e-5, rtol=1e-5)


def test_one_lm_pass_serves_every_prompt_and_rows_are_example_major(tiny_lm: Any) -> None:
    ensemble = PromptEnsemble(_members(tiny_lm, "bert", shared=True))
    calls = []
    handle = ensemble.lm.base_model.register_forward_hook(lambda mod, args, out: calls.append(out.last_hidden_state.shape[0]))
    try:
        groups = ensemble.encode(TEXTS[:3])
        batch = ensemble.collate(groups)
        with torch.no_grad():
            ensemble(**batch)
    finally:
        handle.remove()
    assert calls == [6]
    assert batch["input_ids"][1, : len(groups[0].members[1].input_ids)].tolist() == groups[0].members[1].input_ids


def test_joint_training_runs_through_the_trainer_and_changes_every_member(tiny_lm: Any) -> None:
    ensemble = PromptEnsemble(_members(tiny_lm, "bert", shared=True))
    train = [Example(t, label=str(i % 2)) for i, t in enumerate(TEXTS * 2)]
    before = ensemble.predict_logits(TEXTS)
    result = Trainer(ensemble, TrainingArguments(max_steps=3, learning_rate=1e-3, batch_size=4, progress=False), train, train[:4]).train()
    assert result.steps == 3 and len(result.losses) == 3 and result.best_score is not None
    after = ensemble.predict_logits(TEXTS)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, torch.stack([m.predict_logits(TEXTS) for m in ensemble.members]).mean(0), atol=1e-5, rtol=1e-5)


def test_save_and_load_keep_shared_and_separate_lms(tiny_lm: Any, tmp_path: Path) -> None:
    for shared in (True, False):
        ensemble = PromptEnsemble(_members(tiny_lm, "bert", shared=shared))
        ensemble.save_pretrained(tmp_path / str(shared))
        loaded = PromptEnsemble.from_pretrained(tmp_path / str(shared))
        assert loaded.shared_lm is shared
        assert sorted(p.name for p in (tmp_path / str(shared)).iterdir() if p.is_dir()) == (["member_0"] if shared else ["member_0", "member_1"])
        torch.testing.assert_close(loaded.predict_logits(TEXTS), ensemble.predict_logits(TEXTS), atol=1e-5, rtol=1e-5)


def test_bad_ensembles_are_refused(tiny_lm: Any, tmp_path: Path) -> None:
    lm, tokenizer = tiny_lm("bert")
    first = PromptModel(lm, tokenizer, PROMPTS[0])
    with pytest.raises(ValueError, match="at least one member"):
        PromptEnsemble([])
    with pytest.raises(ValueError, match="unknown combine"):
        PromptEnsemble([first], combine="vote")
    other_labels = PromptModel(lm, tokenizer, PromptConfig("{sent_0} {mask}", {"neg": "bad", "pos": "good"}))
    with pytest.raises(ValueError, match="labels"):
        PromptEnsemble([first, other_labels])
    with pytest.raises(ValueError, match="not a label-word prompt model"):
        PromptEnsemble([first, PromptModel(lm, tokenizer, PROMPTS[1], method="finetune")])
    first.save_pretrained(tmp_path / "single")
    with pytest.raises(ValueError, match="not an ensemble"):
        PromptEnsemble.from_pretrained(tmp_path / "single")


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_ensemble_bundle_exports_with_parity_and_serves_through_the_predictor(tiny_lm: Any, tmp_path: Path, arch: str) -> None:
    ensemble = PromptEnsemble(_members(tiny_lm, arch, shared=arch == "bert"))
    bundle = ensemble.export(tmp_path / "bundle", torch_weights=True)
    import json

    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["validation"]["cases"] > 0 and manifest["validation"]["max_abs_diff"] < 1e-4
    expected = ensemble.predict_proba(TEXTS).numpy()
    onnx = Predictor.from_pretrained(bundle, backend="onnx", batch_size=2)
    np.testing.assert_allclose(onnx.predict_proba(TEXTS), expected, atol=1e-4)
    assert onnx.predict("Great!") == ensemble.predict(["Great!"])[0]
    torch_backend = Predictor.from_pretrained(bundle, backend="torch")
    np.testing.assert_allclose(torch_backend.predict_proba(TEXTS), expected, atol=1e-5)
    np.testing.assert_allclose(Predictor.from_model(ensemble).predict_proba(TEXTS), expected, atol=1e-5)
