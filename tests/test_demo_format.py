"""The demonstration format (DemoConfig's order, separator, per_class, label_after): encodings, selection, truncation, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fsserve.config import DemoConfig, PromptConfig
from fsserve.data import Example
from fsserve.demos import DemoIndex
from fsserve.demos.prompting import DemoPrompt, shuffled_order
from fsserve.prompts import Prompt

WORDS = {"0": "terrible", "1": "great"}
ROUND_0 = [Example("Dull stuff.", label="0"), Example("Superb stuff.", label="1")]
ROUND_1 = [Example("Bad one.", label="0"), Example("Good one.", label="1")]
POOL = [Example(t, label="1") for t in ("A gem of a film.", "Superb acting throughout.", "I loved every minute.",
                                         "A warm, funny delight.", "Brilliant and moving.")]
POOL += [Example(t, label="0") for t in ("A total mess.", "Boring and far too long.", "I hated every minute.",
                                          "Dull, lifeless and flat.", "A tedious slog.")]


def _prompt(tokenizer, kind: str, template: str = "{sent_0} It was {mask}.", **cfg) -> Prompt:
    return Prompt(PromptConfig(template, WORDS, **cfg), tokenizer, kind)


def _tok(minilm_tokenizer, gemma_tokenizer, kind: str):
    return minilm_tokenizer if kind == "mlm" else gemma_tokenizer


@pytest.fixture(scope="module")
def index() -> DemoIndex:
    return DemoIndex(POOL, labels=["0", "1"])


# -- the default is LM-BFF's layout, to the byte ----------------------------------------------
GOLDEN = {  # ids written by fsserve before the format was configurable (one demo per class, class order, a space)
    "mlm": [101, 1037, 2986, 2143, 1012, 2009, 2001, 103, 1012, 10634, 4933, 1012, 2009, 2001, 6659, 1012, 21688, 4933,
            1012, 2009, 2001, 2307, 1012, 102],
    "causal": [2, 236796, 1068, 7305, 236761, 1030, 691, 21832, 236761, 6562, 236763, 7305, 236761, 1030, 691, 1822,
               236761, 562, 5851, 4103, 236761, 1030, 691],
}


@pytest.mark.parametrize("kind", ["mlm", "causal"])
def test_the_default_format_encodes_exactly_as_before(minilm_tokenizer, gemma_tokenizer, kind: str) -> None:
    prompt = _prompt(_tok(minilm_tokenizer, gemma_tokenizer, kind), kind)
    for demo_prompt in (DemoPrompt(prompt), DemoPrompt.from_config(prompt, DemoConfig())):
        enc = demo_prompt.encode(["A fine film."], [ROUND_0])[0]
        assert enc.input_ids == GOLDEN[kind] and set(enc.token_type_ids) == {0}
        assert enc.answer_pos == (7 if kind == "mlm" else len(GOLDEN[kind]) - 1)


# -- each option, read back from the decoded ids ----------------------------------------------
@pytest.mark.parametrize("separator, shown", [("\n", "\n"), ("\n\n", "\n\n"), (" | ", " | ")])
def test_the_separator_sits_between_demonstrations_and_before_the_query(gemma_tokenizer, separator: str, shown: str) -> None:
    demo_prompt = DemoPrompt(_prompt(gemma_tokenizer, "causal"), separator=separator)
    enc = demo_prompt.encode(["A fine film."], [ROUND_0])[0]
    assert gemma_tokenizer.decode(enc.input_ids) == (
        f"<bos>Dull stuff. It was terrible.{shown}Superb stuff. It was great.{shown}A fine film. It was")
    assert enc.answer_pos == len(enc.input_ids) - 1


def test_a_masked_lm_separator_follows_the_query_and_skips_the_templates_own_sep(minilm_tokenizer) -> None:
    enc = DemoPrompt(_prompt(minilm_tokenizer, "mlm"), separator=" | ").encode(["A fine film."], [ROUND_0])[0]
    assert minilm_tokenizer.decode(enc.input_ids) == (
        "[CLS] a fine film. it was [MASK]. | dull stuff. it was terrible. | superb stuff. it was great. [SEP]")
    lmbff = _prompt(minilm_tokenizer, "mlm", "*cls**sent_0*_It_was*mask*.*sep+*")
    enc = DemoPrompt(lmbff, separator=" | ").encode(["A fine film."], [ROUND_0])[0]
    assert "|" not in minilm_tokenizer.decode(enc.input_ids)  # every join is already marked by [SEP]


@pytest.mark.parametrize("kind", ["mlm", "causal"])
def test_per_class_lays_demonstrations_out_in_rounds(minilm_tokenizer, gemma_tokenizer, kind: str) -> None:
    tokenizer = _tok(minilm_tokenizer, gemma_tokenizer, kind)
    enc = DemoPrompt(_prompt(tokenizer, kind), per_class=2).encode(["A fine film."], [ROUND_0 + ROUND_1])[0]
    text = tokenizer.decode(enc.input_ids)
    demos = "Dull stuff. It was terrible. Superb stuff. It was great. Bad one. It was terrible. Good one. It was great."
    if kind == "causal":
        assert text == f"<bos>{demos} A fine film. It was"
    else:
        assert text == f"[CLS] a fine film. it was [MASK]. {demos.lower()} [SEP]"
    with pytest.raises(ValueError, match="needs 2 per class"):
        DemoPrompt(_prompt(tokenizer, kind), per_class=2).encode(["A fine film."], [ROUND_0])


@pytest.mark.parametrize("kind", ["mlm", "causal"])
def test_label_after_false_keeps_only_the_demonstration_text(minilm_tokenizer, gemma_tokenizer, kind: str) -> None:
    tokenizer = _tok(minilm_tokenizer, gemma_tokenizer, kind)
    enc = DemoPrompt(_prompt(tokenizer, kind), label_after=False).encode(["A fine film."], [ROUND_0])[0]
    text = tokenizer.decode(enc.input_ids)
    assert "terrible" not in text and "great" not in text
    if kind == "causal":
        assert text == "<bos>Dull stuff. Superb stuff. A fine film. It was" and enc.answer_pos == len(enc.input_ids) - 1
    else:
        assert text == "[CLS] a fine film. it was [MASK]. dull stuff. superb stuff. [SEP]"
        assert enc.input_ids[enc.answer_pos] == tokenizer.mask_token_id


def _demo_order(text: str) -> list[str]:
    """The demonstrations of a decoded decoder prompt, each with the label word it ended with."""
    found = [(text.index(ex.text), ex.text) for ex in ROUND_0 + ROUND_1]
    words = {ex.text: WORDS[ex.label] for ex in ROUND_0 + ROUND_1}
    shown = [t for _, t in sorted(found)]
    for t in shown:
        assert f"{t} It was {words[t]}." in text  # each demonstration keeps its own label word
    return shown


def test_shuffle_is_seeded_by_the_query_text_alone(gemma_tokenizer) -> None:
    demo_prompt = DemoPrompt(_prompt(gemma_tokenizer, "causal"), order="shuffle", per_class=2)
    queries = [f"Query number {i}." for i in range(12)]
    encoded = demo_prompt.encode(queries, [ROUND_0 + ROUND_1] * len(queries))
    orders = [_demo_order(gemma_tokenizer.decode(e.input_ids)) for e in encoded]
    canonical = [ex.text for ex in ROUND_0 + ROUND_1]
    assert all(sorted(o) == sorted(canonical) for o in orders)
    assert len({tuple(o) for o in orders}) > 3  # queries get different orders
    for q, query in enumerate(queries):
        assert orders[q] == [canonical[p] for p in shuffled_order(query, 4)]
        # the same text alone, in another batch, or with other whitespace: the same order, the same ids
        alone = demo_prompt.encode([f"  Query   number {q}. "], [ROUND_0 + ROUND_1])[0]
        assert _demo_order(gemma_tokenizer.decode(alone.input_ids)) == orders[q]
        assert demo_prompt.encode([query], [ROUND_0 + ROUND_1])[0].input_ids == encoded[q].input_ids


@pytest.mark.parametrize("kind", ["mlm", "causal"])
def test_similar_last_puts_the_most_similar_next_to_the_query(minilm_tokenizer, gemma_tokenizer, kind: str) -> None:
    tokenizer = _tok(minilm_tokenizer, gemma_tokenizer, kind)
    demo_prompt = DemoPrompt(_prompt(tokenizer, kind), order="similar-last", per_class=2)
    text = tokenizer.decode(demo_prompt.encode(["A fine film."], [ROUND_0 + ROUND_1], scores=[[0.1, 0.9, 0.5, 0.2]])[0].input_ids)
    ranked = ["dull stuff", "good one", "bad one", "superb stuff"]  # least to most similar
    at = [text.lower().index(t) for t in ranked]
    query = text.lower().index("a fine film")
    assert at == sorted(at) if kind == "causal" else at == sorted(at, reverse=True)
    assert (query > at[-1]) if kind == "causal" else (query < at[-1])
    with pytest.raises(ValueError, match="similar-last"):
        demo_prompt.encode(["A fine film."], [ROUND_0 + ROUND_1])


def test_similar_last_through_the_index_uses_cosine_similarity(gemma_tokenizer, index: DemoIndex) -> None:
    demo_prompt = DemoPrompt(_prompt(gemma_tokenizer, "causal"), order="similar-last", per_class=2)
    query = "What a warm and funny movie."
    for mode in ("top1", "random"):  # random draws are ordered by similarity too
        text = gemma_tokenizer.decode(demo_prompt.encode_selected(index, [query], mode, 0.5, rng=0)[0].input_ids)
        shown = sorted((text.index(ex.text), ex.text) for ex in POOL if ex.text in text)
        assert len(shown) == 4
        vector = index.embed([query])[0]
        similarity = {ex.text: float(index.embeddings[i] @ vector) for i, ex in enumerate(POOL)}
        scores = [similarity[t] for _, t in shown]
        assert scores == sorted(scores)


# -- selection of several per class -----------------------------------------------------------
def test_per_class_selection_takes_the_best_or_distinct_draws(index: DemoIndex) -> None:
    queries = ["What a wonderful film.", "Dreadful and dull."]
    vectors = index.embed(queries)
    best = index.select(queries, mode="top1", per_class=3)
    assert best.shape == (2, 6) and best[:, :2].tolist() == index.select(queries, mode="top1").tolist()
    for q in range(2):
        for j in range(2):
            picks = best[q, j::2]
            assert (index.class_of(picks) == j).all()
            members = [i for i in range(len(index)) if index.class_of([i])[0] == j]
            ranked = sorted(members, key=lambda i: -float(index.embeddings[i] @ vectors[q]))
            assert picks.tolist() == ranked[:3]
    for mode in ("similar", "random"):
        draws = index.select(queries * 20, mode=mode, per_class=2, rng=0)
        for row in draws:
            assert len(set(row.tolist())) == 4 and index.class_of(row).tolist() == [0, 1, 0, 1]
    ids = np.arange(len(index))
    own = index.select_by_id(ids, mode="similar", per_class=2, rng=1)
    assert all(q not in own[q] for q in ids)
    with pytest.raises(ValueError, match="per_class=5 needs 5"):
        index.select_by_id(ids, mode="random", per_class=5)  # each class has 5, one of them the query itself
    with pytest.raises(ValueError, match="per_class"):
        index.select(queries, per_class=0)


# -- truncation when demonstrations are long --------------------------------------------------
def test_long_demonstrations_are_cut_before_a_short_query(gemma_tokenizer) -> None:
    max_length = 64
    prompt = _prompt(gemma_tokenizer, "causal", max_length=max_length)
    long = [Example(" ".join(f"w{i}" for i in range(200)), label=str(c % 2)) for c in range(4)]
    demo_prompt = DemoPrompt(prompt, separator="\n", per_class=2)
    enc = demo_prompt.encode(["Short query."], [long])[0]
    text = gemma_tokenizer.decode(enc.input_ids)
    assert len(enc.input_ids) == max_length and enc.answer_pos == max_length - 1
    assert text.endswith("\nShort query. It was") and text.count("\n") == 4  # the query whole, every separator kept
    assert text.count("It was terrible.") == 2 and text.count("It was great.") == 2  # templates never cut
    kept = [len(gemma_tokenizer(seg.split(" It was")[0], add_special_tokens=False)["input_ids"]) for seg in text.split("\n")[:4]]
    assert max(kept) - min(kept) <= 1  # the longest sentences are shortened first: the demonstrations end up even
    assert all(seg.startswith(("<bos>w0 ", "w0 ")) for seg in text.split("\n")[:4])  # tail cut by default
    long_query = demo_prompt.encode([long[0].text], [long])[0]
    assert len(long_query.input_ids) == max_length and gemma_tokenizer.decode(long_query.input_ids).endswith(" It was")


def test_templates_that_alone_overflow_max_length_are_refused(gemma_tokenizer) -> None:
    prompt = _prompt(gemma_tokenizer, "causal", max_length=16)
    demo_prompt = DemoPrompt(prompt, per_class=3)
    with pytest.raises(ValueError, match="max_length 16 leaves no room"):
        demo_prompt.encode(["A film."], [ROUND_0 * 3])


# -- validation and JSON ----------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [("order", "random"), ("order", "similar"), ("separator", 3), ("separator", None),
                                          ("per_class", 0), ("per_class", 1.5), ("per_class", True), ("label_after", "no")])
def test_bad_format_values_are_refused_naming_the_field(gemma_tokenizer, field: str, value) -> None:
    with pytest.raises(ValueError, match=f"^{field} must .*{value!r}"):
        DemoConfig(**{field: value})
    with pytest.raises(ValueError, match=f"^{field} must"):
        DemoPrompt(_prompt(gemma_tokenizer, "causal"), **{field: value})


def test_the_format_round_trips_through_json_and_old_files_get_the_defaults() -> None:
    config = DemoConfig(train_mode="random", order="similar-last", separator="\n\n", per_class=2, label_after=False)
    assert DemoConfig.from_dict(json.loads(config.to_json())) == config
    old = {"train_mode": "similar", "eval_mode": "top1", "filter_rate": 0.5, "num_sample": 1, "encoder": None, "index_type": "flat"}
    assert DemoConfig.from_dict(old) == DemoConfig()
    assert (DemoConfig().order, DemoConfig().separator, DemoConfig().per_class, DemoConfig().label_after) == ("class", " ", 1, True)
