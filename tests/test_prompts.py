"""Templates (both syntaxes), label words, truncation and the bad inputs each must refuse."""

from __future__ import annotations

import logging

import pytest

from fsserve.config import PromptConfig
from fsserve.data import Example
from fsserve.prompts import Prompt, Template, decoder_template, parse_label_words

SENTIMENT = {"0": "terrible", "1": "great"}


@pytest.mark.parametrize(
    ("readable", "lmbff"),
    [
        ("{cls}{sent_0} It was {mask}.{sep+}", "*cls**sent_0*_It_was*mask*.*sep+*"),
        ("{cls}{sent-_0}? {mask},{+sentl_1}{sep+}", "*cls**sent-_0*?*mask*,*+sentl_1**sep+*"),
        ("{cls}{sent_0} {mask},{+sentl_1}{sep+}", "*cls**sent_0**mask*,*+sentl_1**sep+*"),
        ("{cls} {mask}:{+sent_0}{sep+}", "*cls**mask*:*+sent_0**sep+*"),
        ("{sent_0} This is {mask}.", "*sent_0*_This_is*mask*."),
    ],
)
def test_both_syntaxes_parse_to_one_form(readable: str, lmbff: str) -> None:
    a, b = Template.parse(readable), Template.parse(lmbff)
    assert (a.syntax, b.syntax) == ("readable", "lmbff")
    assert a == b
    assert Template.parse(a.to_readable()) == a


def test_readable_pair_template_from_the_issue() -> None:
    t = Template.parse("{sent_0} ? {mask} , {sent_1}")
    kinds = [p.kind for p in t.parts]
    assert kinds == ["sent", "text", "mask", "text", "sent"]
    assert t.parts[2].space and t.parts[4].space and t.num_sentences == 2


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{sent_0} It was good.", "exactly one {mask}"),
        ("*cls**sent_0*_It_was*sep+*", "exactly one"),
        ("{sent_0} {mask} {mask}", "found 2"),
        ("{sent_0} It was {mask", "unclosed"),
        ("{sent_0} It was {maks}.", "unknown placeholder"),
        ("It was {mask}.", "no sentence slot"),
        ("{sent} It was {mask}.", "needs an index"),
    ],
)
def test_bad_templates_are_refused_by_name(minilm_tokenizer, template: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        Prompt(PromptConfig(template, SENTIMENT), minilm_tokenizer, "mlm")


def test_lmbff_sentence_modifiers(minilm_tokenizer) -> None:
    cfg = PromptConfig("*cls**sent-_0*?*mask*,*+sentl_1**sep+*", {"entailment": "yes", "not_entailment": "no"})
    enc = Prompt(cfg, minilm_tokenizer, "mlm").encode([("The cat sat.", "It Was a cat")])[0]
    tokens = minilm_tokenizer.convert_ids_to_tokens(enc.input_ids)
    assert tokens == ["[CLS]", "the", "cat", "sat", "?", "[MASK]", ",", "it", "was", "a", "cat", "[SEP]"]
    assert enc.answer_pos == tokens.index("[MASK]")
    # sentu upper-cases; label_i inserts a label word (used by demonstrations)
    t = Template.parse("*sentu_0*_*label_1**mask*")
    assert t.parts[0].render(["abc"]) == "Abc" and t.parts[1].kind == "label"


def test_sep_plus_starts_a_new_token_type_segment(minilm_tokenizer) -> None:
    cfg = PromptConfig("*cls**sent_0**sep+**mask**sep+*", SENTIMENT)
    enc = Prompt(cfg, minilm_tokenizer, "mlm").encode(["fine"])[0]
    assert enc.token_type_ids == [0, 0, 0, 1, 1]


def test_readable_template_gets_the_tokenizers_special_tokens(minilm_tokenizer, gemma_tokenizer) -> None:
    enc = Prompt(PromptConfig("{sent_0} It was {mask}.", SENTIMENT), minilm_tokenizer, "mlm").encode(["Good."])[0]
    assert minilm_tokenizer.convert_ids_to_tokens(enc.input_ids) == ["[CLS]", "good", ".", "it", "was", "[MASK]", ".", "[SEP]"]
    dec = Prompt(PromptConfig("{sent_0} It was {mask}.", SENTIMENT), gemma_tokenizer, "causal").encode(["Good."])[0]
    assert dec.input_ids[0] == gemma_tokenizer.bos_token_id
    assert dec.answer_pos == len(dec.input_ids) - 1
    assert gemma_tokenizer.decode(dec.input_ids[1:]) == "Good. It was"


def test_label_words_get_a_leading_space_after_whitespace(gemma_tokenizer) -> None:
    prompt = Prompt(PromptConfig("{sent_0} It was {mask}.", SENTIMENT), gemma_tokenizer, "causal")
    assert gemma_tokenizer.convert_ids_to_tokens(prompt.label_word_ids) == ["▁terrible", "▁great"]


def test_several_words_per_class(minilm_tokenizer) -> None:
    prompt = Prompt(PromptConfig("{sent_0} It was {mask}.", {"0": ["bad", "awful"], "1": "great"}), minilm_tokenizer, "mlm")
    assert prompt.word_to_class == [0, 0, 1]
    assert parse_label_words("0:bad|awful,1:great") == {"0": ["bad", "awful"], "1": ["great"]}


@pytest.mark.parametrize("word", ["supercalifragilistic", "terrible great"])
def test_label_word_not_a_single_token_is_named(minilm_tokenizer, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        Prompt(PromptConfig("{sent_0} It was {mask}.", {"0": word, "1": "great"}), minilm_tokenizer, "mlm")


def test_label_word_outside_the_vocabulary_is_named(minilm_tokenizer) -> None:
    with pytest.raises(ValueError, match="🦜"):
        Prompt(PromptConfig("{sent_0} It was {mask}.", {"0": "🦜", "1": "great"}), minilm_tokenizer, "mlm")


def test_label_not_in_the_label_list() -> None:
    with pytest.raises(ValueError, match=r"'2'"):
        PromptConfig("{sent_0} It was {mask}.", {"0": "bad", "2": "good"}, labels=["0", "1"])


def test_missing_text_b_for_a_pair_template(minilm_tokenizer) -> None:
    prompt = Prompt(PromptConfig("{sent_0} ? {mask} , {sent_1}", {"0": "yes", "1": "no"}), minilm_tokenizer, "mlm")
    with pytest.raises(ValueError, match="text_b"):
        prompt.encode([Example(text="A premise.")])


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_text_is_refused(minilm_tokenizer, text: str) -> None:
    prompt = Prompt(PromptConfig("{sent_0} It was {mask}.", SENTIMENT), minilm_tokenizer, "mlm")
    with pytest.raises(ValueError, match="empty text"):
        prompt.encode([text])


@pytest.mark.parametrize("kind", ["mlm", "causal"])
@pytest.mark.parametrize("truncate_head", [False, True])
def test_truncation_keeps_the_answer_inside_max_length(minilm_tokenizer, gemma_tokenizer, kind: str, truncate_head: bool) -> None:
    tok = minilm_tokenizer if kind == "mlm" else gemma_tokenizer
    cfg = PromptConfig("{sent_0} ? {mask} , {+sentl_1}" if kind == "mlm" else "{sent_0} ? {+sentl_1} ? {mask}",
                       {"0": "yes", "1": "no"}, max_length=32, truncate_head=truncate_head)
    long_a = " ".join(f"word{i}" for i in range(200))
    long_b = "short one"
    for enc in Prompt(cfg, tok, kind).encode([(long_a, long_b), (long_b, long_a), (long_a, long_a)]):
        assert len(enc.input_ids) <= 32
        assert 0 <= enc.answer_pos < len(enc.input_ids)
        if kind == "mlm":
            assert enc.input_ids[enc.answer_pos] == tok.mask_token_id
    first = Prompt(cfg, tok, kind).encode([(long_a, long_b)])[0]
    text = tok.decode(first.input_ids)
    assert ("word199" in text) == truncate_head and ("word0 " in text + " ") != truncate_head
    assert "short one" in text  # the short sentence is not cut while the long one can give


def test_sentence_limits(minilm_tokenizer) -> None:
    cfg = PromptConfig("{sent_0} ? {mask} , {sent_1}", {"0": "yes", "1": "no"}, first_sent_limit=3, other_sent_limit=2)
    enc = Prompt(cfg, minilm_tokenizer, "mlm").encode([("a b c d e", "f g h")])[0]
    assert minilm_tokenizer.convert_ids_to_tokens(enc.input_ids) == ["[CLS]", "a", "b", "c", "?", "[MASK]", ",", "f", "g", "[SEP]"]


def test_decoder_drops_text_after_the_mask_with_a_log(gemma_tokenizer, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="fsserve.prompts"):
        prompt = Prompt(PromptConfig("{sent_0} It was {mask}. Truly.", SENTIMENT), gemma_tokenizer, "causal")
    assert "dropped" in caplog.text and "Truly" in caplog.text
    assert "Truly" not in gemma_tokenizer.decode(prompt.encode(["Fine."])[0].input_ids)


def test_decoder_refuses_a_sentence_after_the_mask_and_suggests_a_fix(gemma_tokenizer) -> None:
    lmbff = "*cls**sent-_0*?*mask*,*+sentl_1**sep+*"
    with pytest.raises(ValueError, match="after the mask"):
        Prompt(PromptConfig(lmbff, {"0": "Yes", "1": "No"}), gemma_tokenizer, "causal")
    fixed = decoder_template(lmbff)
    enc = Prompt(PromptConfig(fixed, {"0": "Yes", "1": "No"}), gemma_tokenizer, "causal").encode([("A cat sat.", "A cat is sitting")])[0]
    assert gemma_tokenizer.decode(enc.input_ids) == "<bos>A cat sat? a cat is sitting?"
