"""Trainer: it learns, it is deterministic, it keeps the best dev weights, regression, freezing."""

from __future__ import annotations

import random

import pytest
import torch

from fsserve.config import PromptConfig, TrainingArguments
from fsserve.data import Example
from fsserve.modeling import PromptModel
from fsserve.training import Trainer, evaluate_model

POSITIVE = ["wonderful", "superb", "lovely", "brilliant"]
NEGATIVE = ["awful", "boring", "dreadful", "clumsy"]
FILLER = ["the film was", "this movie is", "honestly a", "what a", "the story felt"]


def toy_examples(n: int, seed: int) -> list[Example]:
    """A learnable toy task: the label is carried by one polar word among neutral filler."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        word = rng.choice(POSITIVE if label else NEGATIVE)
        out.append(Example(text=f"{rng.choice(FILLER)} {word} {rng.choice(FILLER)}", label=str(label)))
    return out


def _model(tiny_lm, arch: str, method: str = "prompt", regression: bool = False) -> PromptModel:
    lm, tok = tiny_lm(arch)
    if regression:
        cfg = PromptConfig("{sent_0} ? {mask} , {sent_1}" if arch == "bert" else "{sent_0} , {sent_1} ? {mask}",
                           {"0": "no", "1": "yes"}, regression_range=[0.0, 5.0])
    else:
        cfg = PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"})
    return PromptModel(lm, tok, cfg, method=method)


def _args(**kw: object) -> TrainingArguments:
    base = dict(learning_rate=5e-3, batch_size=8, max_steps=25, eval_steps=25, progress=False, seed=7)
    base.update(kw)
    return TrainingArguments(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ("bert", "gemma"))
@pytest.mark.parametrize("method", ("prompt", "finetune"))
def test_training_learns_a_toy_task(tiny_lm, arch: str, method: str) -> None:
    train = toy_examples(32, seed=1)
    model = _model(tiny_lm, arch, method)
    before = evaluate_model(model, train, "acc")["score"]
    result = Trainer(model, _args(method=method, max_steps=50), train).train()
    after = evaluate_model(model, train, "acc")["score"]
    assert sum(result.losses[-5:]) / 5 < 0.7 * sum(result.losses[:5]) / 5
    assert after >= 0.9 and after > before


def test_training_is_deterministic_under_a_seed(tiny_lm) -> None:
    train = toy_examples(16, seed=2)
    states = []
    for _ in range(2):
        model = _model(tiny_lm, "bert")
        Trainer(model, _args(max_steps=4), train).train()
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    other = _model(tiny_lm, "bert")
    Trainer(other, _args(max_steps=4, seed=8), train).train()
    assert any(not torch.equal(states[0][k], v) for k, v in other.state_dict().items())


class _ScriptedDevTrainer(Trainer):
    """Real training, but the dev scores are given (so which step is best is known) and the weights at each evaluation are kept."""

    def __init__(self, model: PromptModel, args: TrainingArguments, train: list[Example], dev: list[Example], scores: list[float]) -> None:
        super().__init__(model, args, train, dev)
        self.scores = iter(scores)
        self.weights_at_eval: list[dict[str, torch.Tensor]] = []

    def evaluate(self, examples: list[Example]) -> dict[str, object]:  # type: ignore[override]
        self.weights_at_eval.append({n: p.detach().clone() for n, p in self.model.named_parameters()})
        return {"metric": self.metric, "score": next(self.scores), "predictions": [], "n": len(examples)}


def test_the_best_dev_weights_are_restored(tiny_lm) -> None:
    scores = [0.5, 0.9, 0.7, 0.9, 0.6, 0.8]  # step 10 is best; step 20 only ties it, and the last step is worse
    model = _model(tiny_lm, "bert")
    trainer = _ScriptedDevTrainer(model, _args(max_steps=30, eval_steps=5), toy_examples(32, seed=3), toy_examples(16, seed=4), scores=scores)
    result = trainer.train()
    assert result.evals == list(zip(range(5, 31, 5), scores)) and (result.best_step, result.best_score) == (10, 0.9)
    at_step_10, at_step_30 = trainer.weights_at_eval[1], trainer.weights_at_eval[-1]
    assert any(not torch.equal(at_step_10[n], at_step_30[n]) for n in at_step_10)  # training moved on: restoring matters
    assert all(torch.equal(p, at_step_10[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("arch", ("bert", "gemma"))
def test_regression_trains_with_the_kl_loss(tiny_lm, arch: str) -> None:
    rng = random.Random(5)
    train = []
    for i in range(32):
        high = i % 2 == 1
        a = f"{rng.choice(FILLER)} {rng.choice(POSITIVE)}"
        b = a if high else f"{rng.choice(FILLER)} {rng.choice(NEGATIVE)}"
        train.append(Example(text=a, text_b=b, label=4.5 if high else 0.5))
    model = _model(tiny_lm, arch, regression=True)
    result = Trainer(model, _args(max_steps=50, learning_rate=1e-2), train).train()
    assert sum(result.losses[-5:]) < 0.7 * sum(result.losses[:5])
    score = evaluate_model(model, train, "pearson")["score"]
    assert score > 0.8
    values = model.predict([(ex.text, ex.text_b) for ex in train])
    assert all(0.0 <= v <= 5.0 for v in values)


def test_zero_shot_does_not_touch_the_weights(tiny_lm) -> None:
    model = _model(tiny_lm, "bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = Trainer(model, _args(method="zero-shot"), toy_examples(8, seed=6)).train()
    assert result.steps == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_freezing_embeddings_keeps_them_byte_for_byte(tiny_lm) -> None:
    model = _model(tiny_lm, "gemma")
    emb = model.lm.get_input_embeddings().weight.detach().clone()
    layer = model.backbone.layers[0].mlp.up_proj.weight.detach().clone()
    Trainer(model, _args(max_steps=3, freeze_embeddings=True), toy_examples(16, seed=7)).train()
    assert torch.equal(emb, model.lm.get_input_embeddings().weight)
    assert not torch.equal(layer, model.backbone.layers[0].mlp.up_proj.weight)


def test_a_label_outside_the_label_list_is_named(tiny_lm) -> None:
    with pytest.raises(ValueError, match="'positive'"):
        Trainer(_model(tiny_lm, "bert"), _args(), [Example(text="fine", label="positive")])


@pytest.mark.parametrize(("field", "value"), [("method", "magic"), ("batch_size", 0), ("learning_rate", 0.0)])
def test_bad_training_arguments_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field.split("_")[0]):
        TrainingArguments(**{field: value})  # type: ignore[arg-type]
