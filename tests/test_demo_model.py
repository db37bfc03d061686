"""Demonstrations wired into PromptModel, Trainer, save/load and Predictor (tiny LMs, real MiniLM encoder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fsserve.config import DemoConfig, PromptConfig, TrainingArguments
from fsserve.data import Example
from fsserve.demos import DemoIndex
from fsserve.modeling import PromptModel
from fsserve.predictor import Predictor
from fsserve.training import Trainer

POOL = [
    Example("a warm and funny film", label="1"), Example("a superb, moving story", label="1"),
    Example("lovely acting throughout", label="1"), Example("boring and far too long", label="0"),
    Example("an awful, clumsy script", label="0"), Example("dreadful pacing and dull jokes", label="0"),
]


@pytest.fixture(scope="module")
def pool_index() -> DemoIndex:
    return DemoIndex(POOL, labels=["0", "1"])


def _model(tiny_lm, arch: str = "bert") -> PromptModel:
    lm, tok = tiny_lm(arch)
    return PromptModel(lm, tok, PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"}, max_length=96))


@pytest.mark.parametrize("arch", ("bert", "gemma"))
def test_prompts_carry_one_demo_per_class_in_the_right_place(tiny_lm, pool_index: DemoIndex, arch: str) -> None:
    model = _model(tiny_lm, arch)
    model.attach_demos(pool_index, DemoConfig(eval_mode="top1"))
    enc = model.encode(["a funny and warm movie"])[0]
    text = model.tokenizer.decode(enc.input_ids)
    assert "terrible" in text and "great" in text and "warm and funny" in text
    query_at = text.index("movie")
    demo_at = text.index("warm and funny")
    assert (demo_at > query_at) if arch == "bert" else (demo_at < query_at)
    assert 0 <= enc.answer_pos < len(enc.input_ids)


def test_training_draws_fresh_demos_and_prediction_uses_top1(tiny_lm, pool_index: DemoIndex, monkeypatch) -> None:
    model = _model(tiny_lm)
    model.attach_demos(pool_index, DemoConfig(train_mode="similar"))
    modes = []
    real = pool_index.select
    monkeypatch.setattr(pool_index, "select", lambda *a, **k: modes.append(k.get("mode")) or real(*a, **k))
    Trainer(model, TrainingArguments(max_steps=3, batch_size=4, learning_rate=1e-3, progress=False), POOL).train()
    assert modes.count("similar") == 3
    model.predict(["what a lovely film"])
    assert modes[-1] == "top1"


def test_num_sample_averages_several_draws(tiny_lm, pool_index: DemoIndex) -> None:
    model = _model(tiny_lm)
    model.attach_demos(pool_index, DemoConfig(eval_mode="random", num_sample=4))
    averaged = model.predict_logits(["a film"])
    draws = []
    from fsserve.demos.prompting import query_rngs

    for draw in range(4):
        batch = model.collate(model.encode(["a film"], demo_mode="random", rng=query_rngs(["a film"], draw)))
        with torch.no_grad():
            draws.append(model(**batch))
    torch.testing.assert_close(averaged, torch.stack(draws).mean(0), atol=1e-5, rtol=0)


def test_save_load_keeps_the_pool_and_predictions(tiny_lm, pool_index: DemoIndex, tmp_path: Path) -> None:
    model = _model(tiny_lm)
    model.attach_demos(pool_index)
    texts = ["a lovely film", "so dull"]
    before = model.predict_logits(texts)
    model.save_pretrained(tmp_path / "m")
    loaded = PromptModel.from_pretrained(tmp_path / "m")
    assert loaded.demo_index is not None and len(loaded.demo_index) == len(POOL)
    torch.testing.assert_close(loaded.predict_logits(texts), before, atol=0, rtol=0)
    predictor = Predictor.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(torch.from_numpy(predictor.label_logits(texts)), before, atol=1e-6, rtol=0)


def test_added_demonstrations_are_visible_to_the_next_prediction(tiny_lm) -> None:
    index = DemoIndex(POOL, labels=["0", "1"])
    model = _model(tiny_lm)
    model.attach_demos(index)
    query = "the soundtrack was gorgeous"
    assert "gorgeous soundtrack" not in model.tokenizer.decode(model.encode([query])[0].input_ids)
    index.add(["a gorgeous soundtrack and score"], ["1"])
    assert "gorgeous soundtrack" in model.tokenizer.decode(model.encode([query])[0].input_ids)


def test_pool_classes_must_match_and_finetune_refuses_demos(tiny_lm, pool_index: DemoIndex) -> None:
    lm, tok = tiny_lm("bert")
    other = PromptModel(lm, tok, PromptConfig("{sent_0} It was {mask}.", {"neg": "terrible", "pos": "great"}))
    with pytest.raises(ValueError, match="classes"):
        other.attach_demos(pool_index)
    lm, tok = tiny_lm("bert")
    ft = PromptModel(lm, tok, PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"}), method="finetune")
    with pytest.raises(ValueError, match="prompt method"):
        ft.attach_demos(pool_index)


def test_the_bundle_carries_the_pool_and_the_onnx_predictor_uses_it(tiny_lm, pool_index: DemoIndex, tmp_path: Path) -> None:
    model = _model(tiny_lm)
    model.attach_demos(pool_index)
    texts = ["a lovely film", "so dull"]
    expected = model.predict_logits(texts).numpy()
    bundle = model.export(tmp_path / "bundle")
    assert (bundle / "demos").is_dir()
    onnx = Predictor.from_pretrained(bundle, backend="onnx")
    import numpy as np

    np.testing.assert_allclose(onnx.label_logits(texts), expected, atol=1e-4)


FORMATS = [DemoConfig(train_mode="similar", order="shuffle", separator="\n", per_class=2),
           DemoConfig(train_mode="random", order="similar-last", separator="\n\n", label_after=False)]


@pytest.mark.parametrize("config", FORMATS, ids=["shuffle-2-per-class", "similar-last-no-label"])
def test_a_demo_format_trains_saves_and_predicts_alike(tiny_lm, pool_index: DemoIndex, tmp_path: Path, config: DemoConfig) -> None:
    model = _model(tiny_lm, "gemma")
    model.attach_demos(pool_index, config)
    Trainer(model, TrainingArguments(max_steps=2, batch_size=4, learning_rate=1e-3, progress=False), POOL).train()
    texts = ["a lovely film", "so dull"]
    text = model.tokenizer.decode(model.encode(texts[:1])[0].input_ids)
    assert text.count(config.separator) == 2 * config.per_class and ("It was great" in text) == config.label_after
    before = model.predict_logits(texts)
    model.save_pretrained(tmp_path / "m")
    loaded = PromptModel.from_pretrained(tmp_path / "m")
    assert loaded.demo_config == config
    assert [e.input_ids for e in loaded.encode(texts)] == [e.input_ids for e in model.encode(texts)]
    torch.testing.assert_close(loaded.predict_logits(texts), before, atol=0, rtol=0)
    predictor = Predictor.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(torch.from_numpy(predictor.label_logits(texts)), before, atol=1e-6, rtol=0)


def test_a_bundle_serves_the_demo_format_it_was_trained_with(tiny_lm, pool_index: DemoIndex, tmp_path: Path) -> None:
    import json

    import numpy as np

    from fsserve.bundle import read_bundle_config
    from fsserve.predictor import bundle_encoder

    config = DemoConfig(order="similar-last", separator="\n", per_class=2)
    model = _model(tiny_lm, "gemma")
    model.attach_demos(pool_index, config)
    texts = ["a lovely film", "so dull", "a funny and warm movie"]
    expected = model.predict_logits(texts).numpy()
    bundle = model.export(tmp_path / "bundle")
    saved = json.loads((bundle / "fsserve.json").read_text())["demos"]["config"]
    assert {k: saved[k] for k in ("order", "separator", "per_class", "label_after")} == {
        "order": "similar-last", "separator": "\n", "per_class": 2, "label_after": True}
    encode, _ = bundle_encoder(bundle, read_bundle_config(bundle))  # the served path's encoder (torch-free)
    assert [e.input_ids for e in encode(texts)] == [e.input_ids for e in model.encode(texts)]
    onnx = Predictor.from_pretrained(bundle, backend="onnx")
    np.testing.assert_allclose(onnx.label_logits(texts), expected, atol=1e-4)


def test_the_bundle_encoder_keeps_to_the_predictors_threads(tiny_lm, pool_index: DemoIndex, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """intra_op_num_threads bounds the demonstration encoder too (a Ray replica of one CPU must not spawn one thread per core)."""
    from fsserve.predictor import load_bundle_demos

    model = _model(tiny_lm, "gemma")
    model.attach_demos(pool_index, DemoConfig())
    bundle = model.export(tmp_path / "bundle")

    def threads(index: DemoIndex) -> int:
        return index._encoder.session.get_session_options().intra_op_num_threads

    assert threads(load_bundle_demos(bundle, 1)) == 1 and threads(load_bundle_demos(bundle)) == 0  # 0: onnxruntime's default
    seen: list[int | None] = []
    real = load_bundle_demos

    def spy(path: Path, num_threads: int | None = None) -> DemoIndex:
        seen.append(num_threads)
        return real(path, num_threads)

    monkeypatch.setattr("fsserve.predictor.load_bundle_demos", spy)
    Predictor.from_pretrained(bundle, backend="onnx", intra_op_num_threads=1)
    assert seen == [1]


@pytest.mark.parametrize("mode", ["similar", "random"])
def test_sampled_evaluation_draws_per_query_and_the_bundle_averages_the_same_draws(tiny_lm, pool_index: DemoIndex, tmp_path: Path,
                                                                                  mode: str) -> None:
    """LM-BFF's averaged draws: a query's draws ignore its batch, and the served path averages exactly the torch model's draws."""
    import numpy as np

    model = _model(tiny_lm, "gemma")
    model.attach_demos(pool_index, DemoConfig(eval_mode=mode, num_sample=4, filter_rate=1.0))
    texts = ["a lovely film", "so dull", "a funny and warm movie"]
    expected = model.predict_logits(texts)
    torch.testing.assert_close(model.predict_logits(texts[1:2]), expected[1:2], atol=1e-5, rtol=0)  # alone = in a batch
    from fsserve.demos.prompting import query_rngs

    draws = [model.encode(texts, demo_mode=mode, rng=query_rngs(texts, d)) for d in range(4)]
    assert any(len({tuple(d[i].input_ids) for d in draws}) > 1 for i in range(len(texts)))  # the draws really differ
    np.testing.assert_allclose(Predictor.from_model(model).label_logits(texts), expected.numpy(), atol=1e-5)
    bundle = model.export(tmp_path / "bundle")
    onnx = Predictor.from_pretrained(bundle, backend="onnx")
    np.testing.assert_allclose(onnx.label_logits(texts), expected.numpy(), atol=1e-4)
    np.testing.assert_allclose(onnx.label_logits(texts[::-1]), expected.numpy()[::-1], atol=1e-4)
    from fsserve.exporters.triton_text import export_triton_text_repository

    with pytest.raises(ValueError, match="averages 4 draws"):  # Triton's ensemble has one graph row per text
        export_triton_text_repository(bundle, tmp_path / "triton")
