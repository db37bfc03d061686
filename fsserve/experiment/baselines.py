"""GPT-3-style in-context learning: as many labelled training examples as fit, before the query, no training.

Each context example is the task's template with its own sentences and the mask replaced by the
label word of its class (``fsserve.demos.prompting.demo_segment``), so the context reads exactly like
the query's prompt with the answer filled in::

    [CLS] dull. It was terrible. [SEP] a gem. It was great. [SEP] ... {query} It was [MASK].

For both LM kinds the context goes *before* the query (LM-BFF's ``gpt3_in_context_head``). Every
query gets its own random order of the training set (seeded by the run seed and the query's
position); examples are added in that order, whole, while the prompt still fits ``max_length``,
up to ``max_examples`` (LM-BFF's ``gpt3_in_context_num`` = 32). Nothing is trained.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fsserve.demos.prompting import _join, demo_segment
from fsserve.prompts import Encoded, Prompt, Template, example_texts

logger = logging.getLogger(__name__)


class InContextPrompt:
    """Encode queries behind a context of filled-in training examples (GPT-3's in-context learning).

    >>> icl = InContextPrompt(model.prompt, train_examples, seed=13)  # doctest: +SKIP
    >>> enc = icl.encode(["A gorgeous, moving film."])  # doctest: +SKIP
    >>> len(enc[0].input_ids) <= model.prompt_config.max_length  # doctest: +SKIP
    True
    """

    def __init__(self, prompt: Prompt, pool: Sequence[Any], seed: int = 42, max_examples: int = 32) -> None:
        if not isinstance(prompt, Prompt):
            raise ValueError(f"InContextPrompt wraps a fsserve.prompts.Prompt, got {type(prompt).__name__}")
        if not pool:
            raise ValueError("in-context learning needs at least one labelled training example")
        if max_examples < 0:
            raise ValueError(f"max_examples must be >= 0, got {max_examples}")
        self.prompt = prompt
        self.pool = list(pool)
        self.seed = int(seed)
        self.max_examples = min(int(max_examples), len(self.pool))
        self.width = prompt.template.num_sentences
        self.classes = [self._class_of(ex) for ex in self.pool]
        self._encoders: dict[tuple[int, ...], Prompt] = {}

    def _class_of(self, example: Any) -> int:
        """Class position whose label word fills an example's mask (regression: low/high half of the range)."""
        config = self.prompt.config
        if example.label is None:
            raise ValueError(f"context example {example.text[:60]!r} has no label")
        if config.is_regression:
            lo, hi = config.regression_range  # type: ignore[misc]
            return 0 if float(example.label) <= (lo + hi) / 2 else 1
        if str(example.label) not in self.prompt.labels:
            raise ValueError(f"label {example.label!r} is not in the label list {self.prompt.labels}")
        return self.prompt.labels.index(str(example.label))

    def _encoder(self, classes: tuple[int, ...]) -> Prompt:
        """A Prompt whose layout is the filled context examples (of these classes) followed by the query."""
        if classes not in self._encoders:
            context = [demo_segment(self.prompt.template, c, self.width * (1 + i)) for i, c in enumerate(classes)]
            query = list(self.prompt.parts)
            lead = 0
            while lead < len(query) and query[lead].kind == "cls":
                lead += 1
            parts = tuple(query[:lead]) + _join([*context, query[lead:]])
            encoder = copy.copy(self.prompt)  # shares tokenizer, label words and the literal cache
            encoder.template = Template(parts=parts, source=self.prompt.template.source, syntax=self.prompt.template.syntax)
            encoder.parts = parts
            self._encoders[classes] = encoder
        return self._encoders[classes]

    def _encode_with(self, query: Any, order: Sequence[int]) -> Encoded:
        """Encode one query behind the context examples ``order`` (pool ids, in order)."""
        texts = list(example_texts(query, self.width)[: self.width])
        for i in order:
            texts.extend(example_texts(self.pool[i], self.width)[: self.width])
        # Sentence slots: the query is slot 0..width-1, context example i is slot width*(1+i)...
        return self._encoder(tuple(self.classes[i] for i in order)).encode([tuple(texts)])[0]

    def order_for(self, position: int) -> list[int]:
        """The random order in which query ``position`` draws its context (fixed by the seed)."""
        return np.random.default_rng([self.seed, position]).permutation(len(self.pool)).tolist()

    def encode_one(self, query: Any, position: int = 0) -> tuple[Encoded, int]:
        """Encode a query with the longest context that fits whole; returns the encoding and its size."""
        order = self.order_for(position)
        limit = self.prompt.config.max_length
        # Length grows with the number of context examples, so bisect for the largest count that fits
        # with no truncation (a prompt that fills max_length exactly counts as truncated).
        lo, hi = 0, self.max_examples
        best = self._encode_with(query, [])
        while lo < hi:
            mid = (lo + hi + 1) // 2
            enc = self._encode_with(query, order[:mid])
            if len(enc.input_ids) < limit:
                lo, best = mid, enc
            else:
                hi = mid - 1
        return best, lo

    def encode(self, queries: Sequence[Any], start: int = 0) -> list[Encoded]:
        """Encode a batch of queries (query i draws its context with position ``start + i``)."""
        return [self.encode_one(q, start + i)[0] for i, q in enumerate(queries)]


@torch.no_grad()
def in_context_logits(model: Any, pool: Sequence[Any], queries: Sequence[Any], seed: int = 42,
                      max_examples: int = 32, batch_size: int = 8) -> tuple[torch.Tensor, list[int]]:
    """Label logits of an untrained prompt model for queries behind in-context examples, and each context size."""
    if model.method != "prompt":
        raise ValueError("in-context learning scores label words, so it needs a method='prompt' model")
    icl = InContextPrompt(model.prompt, pool, seed=seed, max_examples=max_examples)
    pairs = [icl.encode_one(q, i) for i, q in enumerate(queries)]
    encoded, sizes = [p[0] for p in pairs], [p[1] for p in pairs]
    out = torch.empty(len(encoded), len(model.labels))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    device = next(model.parameters()).device
    model.eval()
    for begin in range(0, len(order), batch_size):
        idx = order[begin : begin + batch_size]
        batch = {k: v.to(device) for k, v in model.collate([encoded[i] for i in idx]).items()}
        out[idx] = model(**batch).float().cpu()
    if sizes:
        logger.info("in-context: %d to %d context examples per query (mean %.1f)", min(sizes), max(sizes), float(np.mean(sizes)))
    return out, sizes
