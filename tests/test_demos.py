"""DemoIndex (real MiniLM encoder, FAISS) and prompts with demonstrations (MLM and decoder layouts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fsserve.config import PromptConfig
from fsserve.data import Example
from fsserve.demos import DemoIndex
from fsserve.demos.prompting import DemoPrompt
from fsserve.prompts import Prompt
from fsserve.utils.atomic import sha256_file

GOOD = ["A gem of a film.", "Superb acting throughout.", "I loved every minute.", "A warm, funny delight.",
        "Brilliant and moving.", "The best movie this year.", "Charming from start to finish.", "A triumph.",
        "Gorgeous to look at and smart.", "Great fun for the whole family."]
BAD = ["A total mess.", "Boring and far too long.", "I hated every minute.", "Dull, lifeless and flat.",
       "The worst movie this year.", "A tedious slog.", "Badly acted and badly written.", "A disaster.",
       "Ugly, stupid and loud.", "Painfully unfunny."]
# "A triumph." appears twice, so the identical-text rule has something to exclude.
POOL = [Example(t, label="1") for t in GOOD] + [Example(t, label="0") for t in BAD] + [Example("A triumph.", label="1")]
QUERIES = ["What a wonderful film.", "Dreadful and dull.", "A triumph.", "Not bad at all, quite good."]
LABELS = ["0", "1"]


@pytest.fixture(scope="module")
def index() -> DemoIndex:
    return DemoIndex(POOL, labels=LABELS)


def brute_force(index: DemoIndex, vector: np.ndarray, cls: int, banned: set[int]) -> list[tuple[float, int]]:
    """Cosine scores of every allowed member of a class, best first (the reference for FAISS)."""
    emb = index.embeddings
    ids = [i for i in range(len(index)) if index.class_of([i])[0] == cls and i not in banned]
    return sorted(((float(emb[i] @ vector), i) for i in ids), reverse=True)


def same_text(index: DemoIndex, text: str) -> set[int]:
    return {i for i, ex in enumerate(index.examples) if ex.text == text}


@pytest.mark.parametrize("mode", ["top1", "similar", "random"])
def test_selection_stays_in_class_and_never_returns_the_query(index: DemoIndex, mode: str) -> None:
    ids = np.arange(len(index))
    for out in (index.select_by_id(ids, mode=mode, rng=0),
                index.select(index.examples, mode=mode, rng=1, exclude=list(ids)),
                index.select([ex.text for ex in index.examples], mode=mode, rng=2)):  # text alone is enough
        assert out.shape == (len(index), 2)
        for j in range(2):
            assert (index.class_of(out[:, j]) == j).all()
        for q in range(len(index)):
            assert q not in out[q]
            assert all(index.examples[d].text != index.examples[q].text for d in out[q])


def test_top1_is_the_brute_force_nearest_neighbour(index: DemoIndex) -> None:
    out = index.select(QUERIES, mode="top1")
    vectors = index.embed(QUERIES)
    for q, text in enumerate(QUERIES):
        for j in range(2):
            ranking = brute_force(index, vectors[q], j, same_text(index, text))
            chosen = float(index.embeddings[out[q, j]] @ vectors[q])
            assert chosen == pytest.approx(ranking[0][0], abs=1e-5)
            assert out[q, j] == ranking[0][1]


def test_similar_samples_only_from_the_top_fraction(index: DemoIndex) -> None:
    vectors = index.embed(QUERIES)
    draws = index.select(QUERIES * 40, mode="similar", filter_rate=0.3, rng=0).reshape(40, len(QUERIES), 2)
    for q, text in enumerate(QUERIES):
        for j in range(2):
            ranking = brute_force(index, vectors[q], j, same_text(index, text))
            top = {i for _, i in ranking[: max(1, int(len(ranking) * 0.3))]}
            seen = set(draws[:, q, j].tolist())
            assert seen <= top
            assert len(seen) > 1  # it samples, it does not always take the best


def test_random_is_uniform_over_the_class(index: DemoIndex) -> None:
    draws = index.select_by_id(np.zeros(600, dtype=int), mode="random", rng=3)  # query: pool id 0, class "1"
    members = [np.flatnonzero(index.class_of(np.arange(len(index))) == j) for j in range(2)]
    assert set(draws[:, 1].tolist()) == set(members[1].tolist()) - {0}
    counts = np.bincount(draws[:, 0], minlength=len(index))[members[0]]
    assert counts.min() > 30 and counts.max() < 100  # 10 members, 60 draws expected each


def test_batch_search_equals_per_query_search(index: DemoIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    batch = index.select(QUERIES, mode="top1")
    single = np.concatenate([index.select([q], mode="top1") for q in QUERIES])
    np.testing.assert_array_equal(batch, single)
    # one encoder call per batch, and none when the caller passes the embeddings (num_sample draws)
    calls: list[int] = []
    embed = DemoIndex.embed
    monkeypatch.setattr(DemoIndex, "embed", lambda self, texts: calls.append(len(texts)) or embed(self, texts))
    vectors = index.embed(QUERIES)
    assert index.select(QUERIES, mode="top1").tolist() == batch.tolist() and calls == [4, 4]
    assert index.select(QUERIES, mode="top1", embeddings=vectors).tolist() == batch.tolist() and calls == [4, 4]
    assert index.demos(batch)[0][1] is index.examples[batch[0, 1]]
    with pytest.raises(ValueError, match="shape"):
        index.select(QUERIES, embeddings=vectors[:2])


def test_save_load_gives_identical_selections_without_reembedding(index: DemoIndex, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    index.save(tmp_path / "demos")
    before = index.select(QUERIES, mode="top1"), index.select_by_id(range(len(index)), mode="similar", rng=5)
    monkeypatch.setattr(DemoIndex, "embed", lambda self, texts: pytest.fail("load re-embedded the pool"))
    loaded = DemoIndex.load(tmp_path / "demos")
    np.testing.assert_array_equal(loaded.embeddings, index.embeddings)
    assert loaded.select_by_id(range(len(index)), mode="similar", rng=5).tolist() == before[1].tolist()
    monkeypatch.undo()
    assert loaded.select(QUERIES, mode="top1").tolist() == before[0].tolist()


def _rewrite_meta_sha(root: Path, name: str) -> None:
    meta = json.loads((root / "demo_index.json").read_text())
    meta["sha256"][name] = sha256_file(root / name)
    (root / "demo_index.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("tamper, message", [
    ("text", "pool.json .*sha256"),
    ("embedding", "embeddings.npy .*sha256"),
    ("rows", "do not match the pool"),
    ("swap_index", "index_0.faiss"),
    ("encoder", "was embedded with"),
])
def test_a_tampered_pool_is_refused(index: DemoIndex, tmp_path: Path, tamper: str, message: str) -> None:
    root = index.save(tmp_path / "demos")
    kwargs = {}
    if tamper == "text":
        pool = json.loads((root / "pool.json").read_text())
        pool["texts"][0] = "A different sentence."
        (root / "pool.json").write_text(json.dumps(pool))
    elif tamper == "embedding":
        emb = np.load(root / "embeddings.npy")
        emb[0] = emb[1]
        np.save(root / "embeddings.npy", emb, allow_pickle=False)
    elif tamper == "rows":  # a consistent-looking meta whose embeddings lost a row
        np.save(root / "embeddings.npy", np.load(root / "embeddings.npy")[:-1], allow_pickle=False)
        _rewrite_meta_sha(root, "embeddings.npy")
    elif tamper == "swap_index":
        a, b = (root / "index_0.faiss").read_bytes(), (root / "index_1.faiss").read_bytes()
        (root / "index_0.faiss").write_bytes(b)
        (root / "index_1.faiss").write_bytes(a)
        _rewrite_meta_sha(root, "index_0.faiss")
        _rewrite_meta_sha(root, "index_1.faiss")
    else:
        kwargs["encoder"] = "sentence-transformers/all-mpnet-base-v2"
    with pytest.raises(ValueError, match=message):
        DemoIndex.load(root, **kwargs)


def test_add_is_visible_to_the_next_select_without_reembedding_the_pool(tmp_path: Path) -> None:
    index = DemoIndex(POOL[:4] + POOL[10:14], labels=LABELS)
    old = index.embeddings.copy()
    query = "An utterly magical masterpiece of cinema."
    assert index.select([query], mode="top1")[0, 1] < 8
    index.add(["A magical masterpiece of cinema.", "Tiresome."], ["1", "0"])
    np.testing.assert_array_equal(index.embeddings[:8], old)
    assert len(index) == 10 and index.select([query], mode="top1")[0, 1] == 8
    assert index.class_of([8, 9]).tolist() == [1, 0]
    with pytest.raises(ValueError, match="not one of the classes"):
        index.add(["Meh."], ["neutral"])
    index.save(tmp_path / "grown")
    assert DemoIndex.load(tmp_path / "grown").select([query], mode="top1")[0, 1] == 8


def test_regression_pool_uses_the_median_split() -> None:
    pool = [Example("A man plays.", "A man is playing.", 4.8), Example("A cat eats.", "A dog runs.", 0.4),
            Example("Two kids swim.", "Children are swimming.", 4.2), Example("It rains.", "The sun shines.", 2.5)]
    index = DemoIndex(pool, task="STS-B")
    assert index.classes == ["0", "1"] and index.class_of(range(4)).tolist() == [1, 0, 1, 0]  # 2.5 <= median: low
    assert DemoIndex(pool, threshold=4.5).class_of(range(4)).tolist() == [1, 0, 0, 0]
    with pytest.raises(ValueError, match="task= or threshold="):
        DemoIndex(pool)


@pytest.mark.parametrize("index_type", ["ivf", "hnsw"])
def test_approximate_indexes_find_the_exact_neighbour_and_survive_save(index_type: str, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((400, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    table = {f"s{i}": v for i, v in enumerate(vectors)}
    monkeypatch.setattr(DemoIndex, "embed", lambda self, texts: np.stack([table[t] for t in texts]))
    pool = [Example(f"s{i}", label=str(i % 2)) for i in range(300)]
    index = DemoIndex(pool, labels=LABELS, index_type=index_type)
    queries = [f"s{i}" for i in range(300, 400)]
    out = index.select(queries, mode="top1")
    for q in range(100):
        for j in range(2):
            assert out[q, j] == brute_force(index, vectors[300 + q], j, set())[0][1]
    index.save(tmp_path / index_type)
    assert DemoIndex.load(tmp_path / index_type).select(queries, mode="top1").tolist() == out.tolist()


def test_bad_selection_arguments_are_refused(index: DemoIndex) -> None:
    with pytest.raises(ValueError, match="mode"):
        index.select(QUERIES, mode="nearest")
    with pytest.raises(ValueError, match="filter_rate"):
        index.select(QUERIES, mode="similar", filter_rate=0.0)
    with pytest.raises(ValueError, match="exclude has 1 entries"):
        index.select(QUERIES, exclude=[0])
    with pytest.raises(ValueError, match="beyond the pool"):
        index.select(QUERIES[:1], exclude=[len(index)])
    with pytest.raises(ValueError, match="index_type"):
        DemoIndex(POOL, index_type="lsh")


# -- prompts with demonstrations ------------------------------------------------------------
WORDS = {"0": "terrible", "1": "great"}
DEMOS = [Example("Dull stuff.", label="0"), Example("Superb stuff.", label="1")]


def _prompt(tokenizer, kind: str, template: str = "{sent_0} It was {mask}.", **cfg) -> Prompt:
    return Prompt(PromptConfig(template, WORDS, **cfg), tokenizer, kind)


@pytest.mark.parametrize("kind", ["mlm", "causal"])
def test_mlm_puts_demos_after_the_query_and_decoders_before(minilm_tokenizer, gemma_tokenizer, kind: str) -> None:
    tokenizer = minilm_tokenizer if kind == "mlm" else gemma_tokenizer
    enc = DemoPrompt(_prompt(tokenizer, kind)).encode(["A fine film."], [DEMOS])[0]
    text = tokenizer.decode(enc.input_ids).lower()
    query, bad, good = text.index("a fine film"), text.index("dull stuff. it was terrible"), text.index("superb stuff. it was great")
    assert bad < good
    if kind == "mlm":
        assert query < bad and enc.input_ids[enc.answer_pos] == tokenizer.mask_token_id
    else:
        assert good < query and enc.answer_pos == len(enc.input_ids) - 1 and text.endswith("a fine film. it was")


@pytest.mark.parametrize("kind", ["mlm", "causal"])
@pytest.mark.parametrize("truncate_head", [False, True])
@pytest.mark.parametrize("template", ["{sent_0} It was {mask}.", "*cls**sent_0*_It_was*mask*.*sep+*"])
def test_truncation_keeps_the_answer_inside_max_length(minilm_tokenizer, gemma_tokenizer, kind: str,
                                                      truncate_head: bool, template: str) -> None:
    tokenizer = minilm_tokenizer if kind == "mlm" else gemma_tokenizer
    max_length = 48
    prompt = _prompt(tokenizer, kind, template, max_length=max_length, truncate_head=truncate_head,
                     first_sent_limit=30, other_sent_limit=12)
    long = " ".join(f"w{i}" for i in range(10 * max_length))  # well over 10x max_length tokens
    demos = [[Example(long, label="0"), Example("Short.", label="1")], [Example(long, label="0"), Example(long, label="1")]]
    encoded = DemoPrompt(prompt).encode([long, "Short query."], demos)
    for enc in encoded:
        assert len(enc.input_ids) <= max_length and 0 <= enc.answer_pos < len(enc.input_ids)
        if kind == "mlm":
            assert enc.input_ids[enc.answer_pos] == tokenizer.mask_token_id
        else:
            assert enc.answer_pos == len(enc.input_ids) - 1
        text = tokenizer.decode(enc.input_ids)
        assert "terrible" in text and "great" in text  # the template (and label words) is never cut
    first = tokenizer.decode(encoded[0].input_ids)
    assert ("w0 " in first) != truncate_head  # head truncation keeps the end of each sentence


def test_sentence_limits_cap_the_query_and_the_demos_separately(minilm_tokenizer) -> None:
    prompt = _prompt(minilm_tokenizer, "mlm", max_length=128, first_sent_limit=10, other_sent_limit=4)
    demos = [[Example("bad " * 50, label="0"), Example("fine " * 50, label="1")]]
    tokens = minilm_tokenizer.convert_ids_to_tokens(DemoPrompt(prompt).encode(["good " * 50], demos)[0].input_ids)
    assert (tokens.count("good"), tokens.count("bad"), tokens.count("fine")) == (10, 4, 4)


def test_pair_template_demos_and_token_types_fit_a_bert(tiny_lm, minilm_tokenizer) -> None:
    model, tokenizer = tiny_lm("bert")
    cfg = PromptConfig("*cls**sent-_0*?*mask*,*+sentl_1**sep+*", {"entailment": "Yes", "not_entailment": "No"}, max_length=40)
    demos = [Example("Cats meow.", "They are cats", "entailment"), Example("X is y.", "Y is not x", "not_entailment")]
    enc = DemoPrompt(Prompt(cfg, tokenizer, "mlm")).encode([("A man sleeps.", "He is awake")], [demos])[0]
    assert tokenizer.decode(enc.input_ids) == ("[CLS] a man sleeps? [MASK], he is awake [SEP] cats meow? yes, "
                                               "they are cats [SEP] x is y? no, y is not x [SEP]")
    assert max(enc.token_type_ids) == 1  # BERT has two token types; demos share the second
    import torch

    with torch.no_grad():
        model(input_ids=torch.tensor([enc.input_ids]), token_type_ids=torch.tensor([enc.token_type_ids]))


def test_demo_prompt_refuses_a_wrong_number_of_demos(minilm_tokenizer) -> None:
    demo_prompt = DemoPrompt(_prompt(minilm_tokenizer, "mlm"))
    with pytest.raises(ValueError, match="one per class"):
        demo_prompt.encode(["A film."], [DEMOS[:1]])
    with pytest.raises(ValueError, match="demonstrations for 2 queries"):
        demo_prompt.encode(["A film."], [DEMOS, DEMOS])
