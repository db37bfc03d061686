"""The sentence encoder through bucketed graphs: the vectors and the picks are sentence-transformers' own.

On a CPU the buckets run eagerly (the twin); the ``gpu`` tests capture them on CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fsserve.data import Example
from fsserve.demos import DemoIndex
from fsserve.demos.encoder import DEFAULT_ENCODER, load_encoder, query_encoder
from fsserve.demos.graph_encoder import GraphSentenceEncoder, PooledEncoder, pooling_mode

TEXTS = ["A fine film.", "so dull", "The plot never comes together, and the acting is flat; an hour too long.", "naïve café, 3.5/10",
         " ".join(["a very long review"] * 200)]  # longer than the encoder's 256 tokens: truncated alike
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _matches_sentence_transformers(device: str) -> None:
    """Every text, alone and in ragged batches, gives the vectors sentence-transformers gives."""
    reference = load_encoder(DEFAULT_ENCODER, "cpu").encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    encoder = GraphSentenceEncoder(load_encoder(DEFAULT_ENCODER, device), device=device, batch_buckets=(1, 4), seq_buckets=(16, 64))
    assert encoder.get_embedding_dimension() == reference.shape[1] == 384
    np.testing.assert_allclose(encoder.encode(TEXTS), reference, atol=1e-5)
    np.testing.assert_allclose(encoder.encode(TEXTS[1:3]), reference[1:3], atol=1e-5)  # another bucket, no stale rows
    np.testing.assert_allclose(encoder.encode(TEXTS, batch_size=2), reference, atol=1e-5)
    assert encoder.encode([]).shape == (0, 384)
    assert encoder.backend.plan.seq[-1] >= 256  # the plan covers the encoder's own max length: nothing is refused


def test_the_cpu_twin_gives_sentence_transformers_vectors() -> None:
    _matches_sentence_transformers("cpu")


def test_pooling_is_read_off_the_model_and_unknown_modes_are_refused() -> None:
    model = load_encoder(DEFAULT_ENCODER, "cpu")
    assert pooling_mode(model) == "mean"
    with pytest.raises(ValueError, match="pooling must be one of mean, cls"):
        PooledEncoder(model[0].auto_model, "max")
    assert query_encoder(DEFAULT_ENCODER, "cpu") is model  # the CPU embeds with sentence-transformers itself


@pytest.mark.gpu
@needs_cuda
def test_captured_encoder_gives_sentence_transformers_vectors() -> None:
    _matches_sentence_transformers("cuda")


@pytest.mark.gpu
@needs_cuda
def test_a_cuda_index_embeds_through_graphs_and_picks_what_the_cpu_picks() -> None:
    pool = [Example(t, label=str(i % 2)) for i, t in enumerate(["Great fun.", "A mess.", "Warm and funny.", "Tedious.", "Bold.", "Flat."])]
    cpu, cuda = DemoIndex(pool, labels=["0", "1"], device="cpu"), DemoIndex(pool, labels=["0", "1"], device="cuda")
    assert isinstance(query_encoder(DEFAULT_ENCODER, "cuda"), GraphSentenceEncoder)
    np.testing.assert_allclose(cuda.embed(TEXTS), cpu.embed(TEXTS), atol=1e-4)
    assert cuda.select(TEXTS, mode="top1").tolist() == cpu.select(TEXTS, mode="top1").tolist()
