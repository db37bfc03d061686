"""PromptModel on tiny encoders and decoders: label logits = HF logits gathered, no full vocabulary, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fsserve.config import PromptConfig
from fsserve.modeling import PromptModel

ARCHS = ("bert", "roberta", "gpt2", "gemma")
TEXTS = ["a fine film, warm and funny", "dull.", "The plot never comes together and the acting is flat."]


def _model(tiny_lm, arch: str, method: str = "prompt", words: dict | None = None) -> PromptModel:
    lm, tok = tiny_lm(arch)
    cfg = PromptConfig("{sent_0} It was {mask}.", words or {"0": ["terrible", "bad"], "1": "great"})
    return PromptModel(lm, tok, cfg, method=method).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_label_logits_equal_hf_full_logits_gathered(tiny_lm, arch: str) -> None:
    model = _model(tiny_lm, arch)
    batch = model.collate(model.encode(TEXTS))
    with torch.no_grad():
        ours = model(**batch)
        inputs = {k: v for k, v in batch.items() if k != "answer_pos"}
        full = model.lm(**inputs).logits  # B × seq × vocab: what fsserve never computes
        at_answer = full[torch.arange(len(TEXTS)), batch["answer_pos"]][:, model.prompt.label_word_ids]
        expected = torch.stack([at_answer[:, 0:2].mean(-1), at_answer[:, 2]], dim=-1)
    assert ours.shape == (3, 2)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_vocabulary_projection_is_never_run(tiny_lm, arch: str) -> None:
    model = _model(tiny_lm, arch)
    decoder = model.lm.get_output_embeddings()

    def refuse(*_: object) -> None:
        raise AssertionError("the full-vocabulary decoder ran")

    handle = decoder.register_forward_pre_hook(refuse)
    try:
        batch = model.collate(model.encode(TEXTS))
        model.train()
        loss = model(**batch).logsumexp(-1).sum()
        loss.backward()  # training path too
        model.eval()
        assert model.predict(TEXTS) and len(model.predict(TEXTS)) == 3
    finally:
        handle.remove()


@pytest.mark.parametrize("arch", ("gpt2", "gemma"))
def test_decoder_left_and_right_padding_agree(tiny_lm, arch: str) -> None:
    model = _model(tiny_lm, arch)
    encoded = model.encode(TEXTS)
    with torch.no_grad():
        right = model(**model.collate(encoded, pad_side="right"))
        left = model(**model.collate(encoded, pad_side="left"))
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_equals_one_at_a_time(tiny_lm, arch: str) -> None:
    model = _model(tiny_lm, arch)
    together = model.predict_logits(TEXTS, batch_size=8)
    alone = torch.cat([model.predict_logits([t]) for t in TEXTS])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ("bert", "gemma"))
@pytest.mark.parametrize("method", ("prompt", "finetune"))
def test_save_load_round_trip_gives_identical_predictions(tiny_lm, tmp_path: Path, arch: str, method: str) -> None:
    model = _model(tiny_lm, arch, method=method)
    if method == "finetune":
        torch.nn.init.normal_(model.head.out.weight, std=1.0)  # a head that is not the initial one
    before = model.predict_logits(TEXTS)
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "fsserve.json").is_file()
    assert not list((tmp_path / "saved").rglob("*.bin")) and not list((tmp_path / "saved").rglob("*.pt"))
    loaded = PromptModel.from_pretrained(tmp_path / "saved")
    assert (loaded.method, loaded.kind, loaded.labels) == (model.method, model.kind, model.labels)
    torch.testing.assert_close(loaded.predict_logits(TEXTS), before, atol=0, rtol=0)


def test_from_pretrained_wraps_an_hf_folder(tiny_lm_dir) -> None:
    cfg = PromptConfig("*cls**sent_0*_It_was*mask*.*sep+*", {"0": "terrible", "1": "great"})
    for arch, kind in (("roberta", "mlm"), ("gpt2", "causal")):
        model = PromptModel.from_pretrained(tiny_lm_dir(arch), prompt=cfg)
        assert model.kind == kind
        assert model.predict_proba(["fine"]).shape == (1, 2)


def test_a_folder_that_is_not_a_saved_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a saved fsserve model"):
        PromptModel.from_pretrained(tmp_path)


def test_a_broken_saved_model_is_refused(tiny_lm, tmp_path: Path) -> None:
    _model(tiny_lm, "bert").save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "fsserve.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        PromptModel.from_pretrained(tmp_path / "m")


def test_prompt_is_required_to_wrap_an_lm(tiny_lm_dir) -> None:
    with pytest.raises(ValueError, match="prompt"):
        PromptModel.from_pretrained(tiny_lm_dir("bert"))


def test_encoder_decoder_models_are_refused(minilm_tokenizer) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(minilm_tokenizer), d_model=32, d_ff=37, num_layers=1, num_heads=2, d_kv=16))
    with pytest.raises(ValueError, match="encoder-decoder"):
        PromptModel(t5, minilm_tokenizer, PromptConfig("{sent_0} It was {mask}.", {"0": "bad", "1": "good"}))


def test_finetune_head_uses_cls_for_encoders_and_last_token_for_decoders(tiny_lm) -> None:
    enc = _model(tiny_lm, "bert", method="finetune").encode(["a fine film"])[0]
    assert enc.answer_pos == 0
    dec = _model(tiny_lm, "gemma", method="finetune").encode(["a fine film"])[0]
    assert dec.answer_pos == len(dec.input_ids) - 1


def test_regression_prediction_is_scaled_to_the_label_range(tiny_lm) -> None:
    lm, tok = tiny_lm("bert")
    cfg = PromptConfig("{sent_0} ? {mask} , {sent_1}", {"0": "no", "1": "yes"}, regression_range=[0.0, 5.0])
    model = PromptModel(lm, tok, cfg).eval()
    logits = model.predict_logits([("a cat", "a dog"), ("a man", "a man")])
    probs, values = model.scores_to_predictions(logits)
    expected = (5.0 * torch.softmax(logits, -1)[:, 1]).tolist()
    assert values == pytest.approx(expected) and all(0.0 <= v <= 5.0 for v in values)


@pytest.mark.parametrize("arch", ARCHS)
def test_inference_goes_through_the_fused_op_and_matches_the_training_path(tiny_lm, arch: str, monkeypatch) -> None:
    import fsserve.kernels.label_logits as op

    model = _model(tiny_lm, arch)
    batch = model.collate(model.encode(TEXTS))
    calls = []
    real = op.label_logits
    monkeypatch.setattr(op, "label_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        fused = model(**batch)
    assert calls, "inference did not call fsserve.kernels.label_logits"
    plain = model(**batch).detach()  # grad enabled: the differentiable head
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=0)
