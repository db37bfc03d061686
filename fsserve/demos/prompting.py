"""Prompts with demonstrations: the query's template plus filled-in copies of it, per class.

Each demonstration is the template with its sentences taken from a demo example and the mask
replaced by the label word of that demo's class (a ``label`` part). Placement follows the LM kind:

* masked LM (LM-BFF): ``{query} It was {mask}. {demo_0} It was terrible. {demo_1} It was great.``
* decoder (GPT-3): ``{demo_0} It was terrible. {demo_1} It was great. {query} It was`` — the answer
  is the last position, and a decoder only sees what precedes it.

Those are the defaults; the format is a :class:`fsserve.config.DemoConfig`'s, and the Trainer, the
PromptModel, the Predictor and a bundle all encode through :meth:`DemoPrompt.encode_selected`:

* ``per_class=k``: k demonstrations of each class, in rounds (round r holds each class's r-th pick,
  in class order), so no class sits in one block;
* ``order``: ``class`` (as above); ``shuffle``, a permutation seeded by the query's text (whitespace
  folded), so a query is laid out alike in training, evaluation, the Predictor and the server;
  ``similar-last``, by cosine similarity to the query, the most similar one next to it (last for a
  decoder, first after the query for a masked LM); ties keep the ``class`` order;
* ``separator``: the text at each join between demonstrations and the query. Its trailing spaces
  become the next part's leading space (as in templates), so the default ``" "`` is a word
  boundary, never a lone space token; ``"\\n"`` is a literal newline. No separator follows a
  template's own cls/sep token, which already marks the join;
* ``label_after=False`` (an ablation): each demonstration is its sentence(s) only, without the
  template's text or its label word.

Truncation: the extended template goes through :meth:`fsserve.prompts.Prompt.encode` unchanged, so
encoding is batched per sentence slot and truncation is per sentence: the query's first sentence is
capped at ``first_sent_limit``, every other sentence (the query's second one and all demonstration
sentences) at ``other_sent_limit``, then the longest sentences are shortened first (head or tail,
per ``truncate_head``) until the prompt fits ``max_length``. Long demonstrations are therefore cut
before a shorter query is touched, and sentences that are all long end up equally long. The
template copies, label words and separators are never cut, so the mask/answer position is always
inside ``max_length``; when they alone leave no room for the sentences, encoding raises ValueError.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from fsserve.config import DemoConfig
from fsserve.demos.encoder import query_text
from fsserve.prompts import Encoded, Part, Prompt, Template, example_texts

logger = logging.getLogger(__name__)

MAX_LAYOUTS = 512  # prompts kept per DemoPrompt, one per order of demonstration classes (shuffles)


def _lead_space(part: Part) -> Part:
    """Make a segment's first part start with a space, so BPE tokenizers see a word boundary."""
    if part.kind in ("sent", "label", "mask"):
        return replace(part, space=True)
    if part.kind == "text" and not part.text[:1].isspace():
        return replace(part, text=" " + part.text)
    return part


def _join(segments: Sequence[Sequence[Part]], separator: str = " ") -> tuple[Part, ...]:
    """Concatenate segments with the separator at each join that no cls/sep token already marks."""
    literal = separator.rstrip(" ")
    space = len(literal) < len(separator)
    out: list[Part] = []
    for segment in segments:
        parts = list(segment)
        if out and parts and out[-1].kind not in ("sep", "cls"):
            if literal:
                out.append(Part(kind="text", text=literal))
            if space:
                parts[0] = _lead_space(parts[0])
        out.extend(parts)
    return tuple(out)


def demo_segment(template: Template, class_index: int, slot_offset: int, label_after: bool = True) -> tuple[Part, ...]:
    """The template filled for one demonstration: no cls, sentences moved to new slots, mask → label word."""
    parts: list[Part] = []
    for part in template.parts:
        if part.kind == "cls" or (not label_after and part.kind not in ("sent", "sep")):
            continue
        if part.kind == "sent":
            part = replace(part, index=part.index + slot_offset)
            if not label_after and parts and parts[-1].kind != "sep":
                part = _lead_space(part)  # the text between sentences is gone: keep them apart
        elif part.kind == "mask":
            part = Part(kind="label", index=class_index, space=part.space)
        parts.append(part)
    return tuple(parts)


def text_seed(query: Any) -> int:
    """A 64-bit seed from the query's text (whitespace folded): what seeds every per-query random choice."""
    key = " ".join(query_text(query).split())
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")


def shuffled_order(query: Any, size: int) -> list[int]:
    """The ``shuffle`` order of ``size`` demonstrations: a permutation seeded by the query's text alone."""
    return np.random.default_rng(text_seed(query)).permutation(size).tolist()


class DemoPrompt:
    """A :class:`~fsserve.prompts.Prompt` that encodes each query with demonstrations of every class.

    >>> demo_prompt = DemoPrompt(prompt)  # doctest: +SKIP
    >>> enc = demo_prompt.encode(["A fine film."], [[Example("Dull.", label="0"), Example("Superb.", label="1")]])  # doctest: +SKIP
    >>> tokenizer.decode(enc[0].input_ids)  # doctest: +SKIP
    '[CLS] a fine film. it was [MASK]. dull. it was terrible. superb. it was great. [SEP]'
    """

    def __init__(self, prompt: Prompt, max_token_type: int = 1, *, order: str = "class", separator: str = " ",
                 per_class: int = 1, label_after: bool = True) -> None:
        if not isinstance(prompt, Prompt):
            raise ValueError(f"DemoPrompt wraps a fsserve.prompts.Prompt, got {type(prompt).__name__}")
        if max_token_type < 0:
            raise ValueError(f"max_token_type must be >= 0, got {max_token_type}")
        DemoConfig(order=order, separator=separator, per_class=per_class, label_after=label_after)  # validates the format
        self.prompt = prompt
        self.num_classes = len(prompt.labels)
        self.sentences_per_item = prompt.template.num_sentences
        self.max_token_type = max_token_type
        self.order, self.separator, self.per_class, self.label_after = order, separator, per_class, label_after
        self.num_demos = per_class * self.num_classes
        self._classes = tuple(p % self.num_classes for p in range(self.num_demos))  # rounds, class order in each
        self._layouts: dict[tuple[int, ...], Prompt] = {}
        self._encoder = self._layout(self._classes)
        self.template = self._encoder.template

    @classmethod
    def from_config(cls, prompt: Prompt, config: DemoConfig, max_token_type: int = 1) -> DemoPrompt:
        """The DemoPrompt of a DemoConfig's format (order, separator, per_class, label_after)."""
        return cls(prompt, max_token_type, order=config.order, separator=config.separator, per_class=config.per_class,
                   label_after=config.label_after)

    def _layout(self, classes: tuple[int, ...]) -> Prompt:
        """The prompt whose demonstrations have these classes, in this order (built once, then cached)."""
        encoder = self._layouts.get(classes)
        if encoder is not None:
            return encoder
        prompt, width = self.prompt, self.sentences_per_item
        demos = [demo_segment(prompt.template, c, width * (1 + p), self.label_after) for p, c in enumerate(classes)]
        query = list(prompt.parts)
        if prompt.kind == "mlm":
            parts = _join([query, *demos], self.separator)
        else:
            lead = 0
            while lead < len(query) and query[lead].kind == "cls":
                lead += 1
            parts = tuple(query[:lead]) + _join([*demos, query[lead:]], self.separator)
        # A shallow copy shares the tokenizer, label words and literal cache; only the layout differs.
        encoder = copy.copy(prompt)
        encoder.template = Template(parts=parts, source=prompt.template.source, syntax=prompt.template.syntax)
        encoder.parts = parts
        if len(self._layouts) >= MAX_LAYOUTS:
            self._layouts.clear()
        self._layouts[classes] = encoder
        return encoder

    def _positions(self, query: Any, scores: Sequence[float] | None) -> list[int]:
        """Where each selected demonstration goes: the order of indexes into the query's selection."""
        if self.order == "class":
            return list(range(self.num_demos))
        if self.order == "shuffle":
            return shuffled_order(query, self.num_demos)
        values = np.asarray(scores, dtype=np.float64)
        if values.shape != (self.num_demos,):
            raise ValueError(f"order='similar-last' needs one score per demonstration ({self.num_demos}), got shape {values.shape}")
        # Stable sorts: ties keep the class order. The most similar goes next to the query.
        return np.argsort(values if self.prompt.kind == "causal" else -values, kind="stable").tolist()

    def encode(self, queries: Sequence[Any], demos: Sequence[Sequence[Any]],
               scores: Sequence[Sequence[float]] | None = None) -> list[Encoded]:
        """Encode a batch: ``demos[q]`` holds query q's ``per_class`` rounds of one demonstration per class, in class order.

        ``scores[q][p]`` is the similarity of demonstration p to query q, which ``order="similar-last"`` needs.
        """
        if len(demos) != len(queries):
            raise ValueError(f"got demonstrations for {len(demos)} queries but {len(queries)} queries")
        if self.order == "similar-last" and (scores is None or len(scores) != len(queries)):
            raise ValueError("order='similar-last' needs each demonstration's similarity to its query (scores=, one row per query)")
        width = self.sentences_per_item
        rows: list[tuple[str, ...]] = []
        groups: dict[tuple[int, ...], list[int]] = {}
        for q, (query, chosen) in enumerate(zip(queries, demos)):
            if len(chosen) != self.num_demos:
                need = "one" if self.per_class == 1 else str(self.per_class)
                raise ValueError(f"query {q} has {len(chosen)} demonstrations; the prompt needs {need} per class "
                                 f"({self.num_classes}: {self.prompt.labels})")
            positions = self._positions(query, None if scores is None else scores[q])
            texts = list(example_texts(query, width)[:width])
            for p in positions:
                texts.extend(example_texts(chosen[p], width)[:width])
            rows.append(tuple(texts))
            groups.setdefault(tuple(self._classes[p] for p in positions), []).append(q)
        encoded: list[Encoded] = [None] * len(rows)  # type: ignore[list-item]
        for classes, members in groups.items():
            for q, enc in zip(members, self._layout(classes).encode([rows[q] for q in members])):
                encoded[q] = enc
        if self.max_token_type is not None:
            for enc in encoded:
                enc.token_type_ids = [min(t, self.max_token_type) for t in enc.token_type_ids]
        return encoded

    def encode_selected(self, index: Any, queries: Sequence[Any], mode: str, filter_rate: float, rng: Any = None,
                        embeddings: np.ndarray | None = None) -> list[Encoded]:
        """Pick each query's demonstrations from ``index`` (a DemoIndex) and encode them in this format."""
        if not queries:
            return []
        if self.order == "similar-last" and embeddings is None:
            embeddings = index.embed([query_text(q) for q in queries])  # the scores need them, even for random draws
        chosen = index.select(queries, mode=mode, filter_rate=filter_rate, rng=rng, embeddings=embeddings,
                              per_class=self.per_class)
        scores = None
        if self.order == "similar-last":
            scores = np.einsum("qnd,qd->qn", index.embeddings[chosen], np.asarray(embeddings, dtype=np.float32))
        return self.encode(queries, index.demos(chosen), scores)


def encode_with_demos(prompt: Prompt, queries: Sequence[Any], demos: Sequence[Sequence[Any]]) -> list[Encoded]:
    """One-call form of :class:`DemoPrompt` for callers that do not keep the wrapper around."""
    return DemoPrompt(prompt).encode(queries, demos)


def query_rngs(queries: Sequence[Any], draw: int, seed: int = 0) -> list[np.random.Generator]:
    """One generator per query for evaluation draw ``draw``, seeded by the query's text: the same picks alone or in any batch."""
    return [np.random.default_rng([seed, draw, text_seed(query)]) for query in queries]


def demo_encoder(prompt: Prompt, index: Any, config: DemoConfig) -> Any:
    """An ``encode(rows)`` for the Predictor that picks demonstrations on the fly (one encoder pass per call).

    With sampled evaluation (``eval_mode`` random or similar) it returns ``num_sample`` encodings per
    row, draw by draw (draw d's rows, then d+1's), drawn as :meth:`PromptModel.predict_logits` draws
    them (:func:`query_rngs`); the Predictor averages their logits, as LM-BFF's evaluation does.
    """
    dp = DemoPrompt.from_config(prompt, config)

    def encode(rows: Sequence[Any]) -> list[Encoded]:
        if config.eval_mode == "top1":
            return dp.encode_selected(index, rows, config.eval_mode, config.filter_rate)
        vectors = index.embed([query_text(q) for q in rows]) if rows and (config.eval_mode != "random" or config.order == "similar-last") else None
        out: list[Encoded] = []
        for draw in range(config.num_sample):
            out += dp.encode_selected(index, rows, config.eval_mode, config.filter_rate, rng=query_rngs(rows, draw), embeddings=vectors)
        return out

    return encode
