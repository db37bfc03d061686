"""The sentence encoder as captured CUDA graphs, so picking similar demonstrations costs a replay, not a launch per kernel.

On an H200 the sentence-transformers encode path took 8.7 ms to embed and pick for one query, more
than the LM's own graph-replayed call (benchmarks/RESULTS.md): eager PyTorch launches every small
kernel of the encoder's layers from Python. :class:`GraphSentenceEncoder` runs the same function
(the transformer, its pooling, the L2 normalisation: :class:`PooledEncoder`, which the ONNX export
uses too) through :class:`fsserve.runtime.graphs.GraphBackend`: one graph per (batch bucket ×
sequence bucket), inputs padded to the bucket under the attention mask. On a CPU the same buckets
run eagerly, the twin the CPU tests compare with sentence-transformers.

>>> encoder = GraphSentenceEncoder(load_encoder(DEFAULT_ENCODER, "cuda"), device="cuda")  # doctest: +SKIP
>>> encoder.encode(["A fine film."]).shape  # doctest: +SKIP
(1, 384)
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

POOLINGS = ("mean", "cls")  # what PooledEncoder reproduces of sentence-transformers' Pooling


def pooling_mode(model: Any) -> str:
    """The sentence-transformers model's pooling, refused unless :class:`PooledEncoder` reproduces it."""
    config = model[1].get_config_dict() if len(model) > 1 and hasattr(model[1], "get_config_dict") else {}
    mode = config.get("pooling_mode") or ("mean" if config.get("pooling_mode_mean_tokens") else None)
    if mode not in POOLINGS:
        raise ValueError(f"the encoder pools with {mode!r}; only {', '.join(POOLINGS)} pooling is supported outside sentence-transformers")
    return str(mode)


class PooledEncoder(torch.nn.Module):
    """Transformer → pooling (mean over the mask, or the first token) → L2 normalisation: one function to export or capture."""

    def __init__(self, transformer: torch.nn.Module, mode: str) -> None:
        super().__init__()
        if mode not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {mode!r}")
        self.transformer = transformer
        self.mode = mode

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, dim) unit vectors for one padded batch."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.transformer(**kwargs).last_hidden_state
        if self.mode == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        else:
            pooled = hidden[:, 0]
        return torch.nn.functional.normalize(pooled, dim=-1)


class _BackendView(torch.nn.Module):
    """The pooled encoder with what GraphBackend reads off a prompt model: sizes, pad id, a (B × dim) forward."""

    def __init__(self, pooled: PooledEncoder, dim: int, max_length: int, pad_token_id: int, uses_token_types: bool) -> None:
        super().__init__()
        self.pooled = pooled
        self.prompt_config = SimpleNamespace(max_length=max_length)
        self.pad_token_id, self.head_outputs, self.uses_token_types = pad_token_id, dim, uses_token_types

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_pos: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The embeddings in float32 (``answer_pos`` is the backend's and unused here)."""
        return self.pooled(input_ids, attention_mask, token_type_ids).float()


class GraphSentenceEncoder:
    """The slice of SentenceTransformer that DemoIndex uses (``encode``, ``get_embedding_dimension``), as bucketed graphs.

    ``dtype``: float32 by default, so similarity rankings are the eager encoder's.
    """

    def __init__(self, model: Any, device: str, dtype: str = "float32", batch_buckets: Sequence[int] | None = None,
                 seq_buckets: Sequence[int] | None = None, warmup: bool = False) -> None:
        from fsserve.runtime.graphs import GraphBackend

        self.tokenizer = model.tokenizer
        self.max_length = int(model.max_seq_length)
        self.dim = int(model.get_embedding_dimension())
        uses_types = "token_type_ids" in self.tokenizer.model_input_names
        view = _BackendView(PooledEncoder(model[0].auto_model, pooling_mode(model)), self.dim, self.max_length,
                            int(self.tokenizer.pad_token_id), uses_types)
        self.backend = GraphBackend(view, device=device, dtype=dtype, batch_buckets=batch_buckets, seq_buckets=seq_buckets, warmup=warmup)

    def get_embedding_dimension(self) -> int:
        """The vectors' dimension, as SentenceTransformer reports it."""
        return self.dim

    def encode(self, texts: Sequence[str], batch_size: int = 64, **_: Any) -> np.ndarray:
        """L2-normalised float32 vectors (the batch buckets bound each run; other SentenceTransformer options are implied)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="np")
            ids = np.asarray(enc["input_ids"], dtype=np.int64)
            types = enc.get("token_type_ids")
            out.append(self.backend.label_logits(ids, np.asarray(enc["attention_mask"], dtype=np.int64), np.zeros(len(ids), dtype=np.int64),
                                                 None if types is None else np.asarray(types, dtype=np.int64)))
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)

