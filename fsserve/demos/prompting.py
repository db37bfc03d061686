"""Prompts with demonstrations: the query's template plus one filled-in copy of it per class.

Each demonstration is the template with its sentences taken from a demo example and the mask
replaced by the label word of that demo's class (a ``label`` part). Placement follows the LM kind:

* masked LM (LM-BFF): ``{query} It was {mask}. {demo_0} It was terrible. {demo_1} It was great.``
* decoder (GPT-3): ``{demo_0} It was terrible. {demo_1} It was great. {query} It was`` — the answer
  is the last position, and a decoder only sees what precedes it.

The extended template goes through :meth:`fsserve.prompts.Prompt.encode` unchanged, so encoding is
batched per sentence slot and truncation is per segment: the query's first sentence is capped at
``first_sent_limit``, every other sentence (the query's second one and all demo sentences) at
``other_sent_limit``, then the longest sentences are shortened first (head or tail, per
``truncate_head``) until the prompt fits ``max_length``. The template itself is never cut, so the
mask/answer position is always inside ``max_length``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from fsserve.prompts import Encoded, Part, Prompt, Template, example_texts

logger = logging.getLogger(__name__)


def _lead_space(part: Part) -> Part:
    """Make a segment's first part start with a space, so BPE tokenizers see a word boundary."""
    if part.kind in ("sent", "label", "mask"):
        return replace(part, space=True)
    if part.kind == "text" and not part.text[:1].isspace():
        return replace(part, text=" " + part.text)
    return part


def _join(segments: Sequence[Sequence[Part]]) -> tuple[Part, ...]:
    """Concatenate segments, adding a space at each join that no separator token already marks."""
    out: list[Part] = []
    for segment in segments:
        parts = list(segment)
        if out and parts and out[-1].kind not in ("sep", "cls"):
            parts[0] = _lead_space(parts[0])
        out.extend(parts)
    return tuple(out)


def demo_segment(template: Template, class_index: int, slot_offset: int) -> tuple[Part, ...]:
    """The template filled for one demonstration: no cls, sentences moved to new slots, mask → label word."""
    parts: list[Part] = []
    for part in template.parts:
        if part.kind == "cls":
            continue
        if part.kind == "sent":
            part = replace(part, index=part.index + slot_offset)
        elif part.kind == "mask":
            part = Part(kind="label", index=class_index, space=part.space)
        parts.append(part)
    return tuple(parts)


class DemoPrompt:
    """A :class:`~fsserve.prompts.Prompt` that encodes each query with one demonstration per class.

    >>> demo_prompt = DemoPrompt(prompt)  # doctest: +SKIP
    >>> enc = demo_prompt.encode(["A fine film."], [[Example("Dull.", label="0"), Example("Superb.", label="1")]])  # doctest: +SKIP
    >>> tokenizer.decode(enc[0].input_ids)  # doctest: +SKIP
    '[CLS] a fine film. it was [MASK]. dull. it was terrible. superb. it was great. [SEP]'
    """

    def __init__(self, prompt: Prompt, max_token_type: int = 1) -> None:
        if not isinstance(prompt, Prompt):
            raise ValueError(f"DemoPrompt wraps a fsserve.prompts.Prompt, got {type(prompt).__name__}")
        if max_token_type < 0:
            raise ValueError(f"max_token_type must be >= 0, got {max_token_type}")
        self.prompt = prompt
        self.num_classes = len(prompt.labels)
        self.sentences_per_item = prompt.template.num_sentences
        self.max_token_type = max_token_type
        width = self.sentences_per_item
        demos = [demo_segment(prompt.template, j, width * (1 + j)) for j in range(self.num_classes)]
        query = list(prompt.parts)
        if prompt.kind == "mlm":
            parts = _join([query, *demos])
        else:
            lead = 0
            while lead < len(query) and query[lead].kind == "cls":
                lead += 1
            parts = tuple(query[:lead]) + _join([*demos, query[lead:]])
        self.template = Template(parts=parts, source=prompt.template.source, syntax=prompt.template.syntax)
        # A shallow copy shares the tokenizer, label words and literal cache; only the layout differs.
        self._encoder = copy.copy(prompt)
        self._encoder.template = self.template
        self._encoder.parts = parts

    def encode(self, queries: Sequence[Any], demos: Sequence[Sequence[Any]]) -> list[Encoded]:
        """Encode a batch: ``demos[q]`` holds query q's demonstrations, one per class, in class order."""
        if len(demos) != len(queries):
            raise ValueError(f"got demonstrations for {len(demos)} queries but {len(queries)} queries")
        width = self.sentences_per_item
        rows: list[tuple[str, ...]] = []
        for q, (query, chosen) in enumerate(zip(queries, demos)):
            if len(chosen) != self.num_classes:
                raise ValueError(f"query {q} has {len(chosen)} demonstrations; the prompt needs one per class "
                                 f"({self.num_classes}: {self.prompt.labels})")
            texts = list(example_texts(query, width)[:width])
            for demo in chosen:
                texts.extend(example_texts(demo, width)[:width])
            rows.append(tuple(texts))
        encoded = self._encoder.encode(rows)
        if self.max_token_type is not None:
            for enc in encoded:
                enc.token_type_ids = [min(t, self.max_token_type) for t in enc.token_type_ids]
        return encoded


def encode_with_demos(prompt: Prompt, queries: Sequence[Any], demos: Sequence[Sequence[Any]]) -> list[Encoded]:
    """One-call form of :class:`DemoPrompt` for callers that do not keep the wrapper around."""
    return DemoPrompt(prompt).encode(queries, demos)


def demo_encoder(prompt: Prompt, index: Any, config: Any) -> Any:
    """An ``encode(rows)`` for the Predictor that picks demonstrations on the fly (one encoder pass per call)."""
    dp = DemoPrompt(prompt)

    def encode(rows: Sequence[Any]) -> list[Encoded]:
        if not rows:
            return []
        chosen = index.select(rows, mode=config.eval_mode, filter_rate=config.filter_rate)
        return dp.encode(rows, index.demos(chosen))

    return encode
