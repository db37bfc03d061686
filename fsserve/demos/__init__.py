"""Demonstrations (LM-BFF §6): one labelled example per class appended to every prompt.

- ``encoder``: the sentence encoder (SBERT, all-MiniLM-L6-v2 by default) and the text a query is embedded as;
- ``index``: :class:`DemoIndex`, the labelled pool with its embeddings and one FAISS index per
  class (CPU, or GPU when faiss-gpu is there), random / similar / top-1 selection, atomic save and verified load;
- ``prompting``: :class:`DemoPrompt`, how the chosen demonstrations enter a prompt (order, label
  words, truncation) for masked and decoder LMs alike.

May import: ``fsserve.config``, ``fsserve.data``, ``fsserve.prompts``, ``fsserve.utils``; never a
model, training or serving (the encoder's own package is loaded inside ``load_encoder``).

>>> from fsserve.demos import DemoIndex  # doctest: +SKIP
>>> index = DemoIndex(train_examples, labels=["0", "1"])  # doctest: +SKIP
"""

from __future__ import annotations

from fsserve.demos.encoder import DEFAULT_ENCODER, Query, load_encoder, pair_text, query_text
from fsserve.demos.index import FORMAT, GPU_MAX_K, INDEX_TYPES, MODES, DemoIndex
from fsserve.demos.prompting import DemoPrompt, demo_encoder, encode_with_demos

__all__ = ["DEFAULT_ENCODER", "FORMAT", "GPU_MAX_K", "INDEX_TYPES", "MODES", "DemoIndex", "DemoPrompt", "Query",
           "demo_encoder", "encode_with_demos", "load_encoder", "pair_text", "query_text"]
