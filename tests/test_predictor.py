"""Predictor: str vs list, probabilities, batching, pair inputs and bad input, on the torch backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fsserve.config import PromptConfig
from fsserve.modeling import PromptModel
from fsserve.predictor import Predictor

TEXTS = ["a fine film", "dull and long.", "I loved every minute of it, truly a gem of a movie", "meh"]


@pytest.fixture(scope="module")
def saved(tiny_lm, tmp_path_factory) -> Path:
    lm, tok = tiny_lm("roberta")
    path = tmp_path_factory.mktemp("pred") / "model"
    PromptModel(lm, tok, PromptConfig("{sent_0} It was {mask}.", {"neg": "terrible", "pos": "great"})).save_pretrained(path)
    return path


def test_str_gives_one_label_and_a_list_gives_a_list(saved: Path) -> None:
    predictor = Predictor.from_pretrained(saved, batch_size=3)
    one = predictor.predict("a fine film")
    many = predictor.predict(TEXTS)
    assert one in ("neg", "pos") and isinstance(many, list) and len(many) == 4 and many[0] == one
    proba = predictor.predict_proba(TEXTS)
    assert proba.shape == (4, 2) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(-1), 1.0, atol=1e-6)
    assert predictor.predict_proba("meh").shape == (2,)
    assert [predictor.labels[i] for i in proba.argmax(-1)] == many


def test_predictor_equals_the_model_and_batching_does_not_matter(saved: Path) -> None:
    model = PromptModel.from_pretrained(saved)
    expected = model.predict_proba(TEXTS).numpy()
    for batch_size in (1, 2, 32):
        got = Predictor.from_pretrained(saved, batch_size=batch_size).predict_proba(TEXTS)
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_pair_models_need_text_b(tiny_lm) -> None:
    lm, tok = tiny_lm("bert")
    model = PromptModel(lm, tok, PromptConfig("{sent_0} ? {mask} , {sent_1}", {"entailment": "yes", "not_entailment": "no"}))
    predictor = Predictor.from_model(model)
    with pytest.raises(ValueError, match="texts_b"):
        predictor.predict(["A man sleeps."])
    both = predictor.predict_proba(["A man sleeps.", "Rain."], ["A person rests.", "It is dry."])
    tuples = predictor.predict_proba([("A man sleeps.", "A person rests."), ("Rain.", "It is dry.")])
    np.testing.assert_allclose(both, tuples, atol=1e-6)
    with pytest.raises(ValueError, match="2 texts but 1"):
        predictor.predict(["a", "b"], ["c"])


@pytest.mark.parametrize("bad", [[""], ["fine", "  "], [None]])
def test_empty_text_is_a_value_error(saved: Path, bad: list) -> None:
    with pytest.raises(ValueError, match="empty"):
        Predictor.from_pretrained(saved).predict(bad)


def test_bad_paths_and_backends(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a folder"):
        Predictor.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="backend"):
        Predictor.from_pretrained(saved, backend="tensorflow")
    with pytest.raises(ValueError, match="fsserve export"):
        Predictor.from_pretrained(saved, backend="onnx")
    with pytest.raises(ValueError, match="device"):
        Predictor.from_pretrained(saved, device="tpu")


def test_empty_list_gives_empty_output(saved: Path) -> None:
    predictor = Predictor.from_pretrained(saved)
    assert predictor.predict([]) == [] and predictor.predict_proba([]).shape == (0, 2)
