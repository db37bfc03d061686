"""Prompts: a parsed template and label words bound to a tokenizer, encoding examples for the LM.

Templates in either syntax (readable ``"{sent_0} It was {mask}."`` or LM-BFF's
``"*cls**sent_0*_It_was*mask*.*sep+*"``) are parsed by :mod:`fsserve.prompts.templates`. The label words of
a mask with a leading space are tokenized with that space (LM-BFF's ``Ġgreat``).

Label words must each be a single token of the model's vocabulary (LM-BFF's choice): a word that
is not is a ``ValueError`` naming it. A class with several words scores the mean of their logits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fsserve.prompts.templates import Part, Template, decoder_template

if TYPE_CHECKING:  # pragma: no cover
    from fsserve.config import PromptConfig
    from fsserve.data import Example

logger = logging.getLogger(__name__)


@dataclass
class Encoded:
    """One tokenized prompt: ids, token types and the position whose output scores the labels."""

    input_ids: list[int]
    token_type_ids: list[int]
    answer_pos: int
    cut: int = 0  # sentence tokens truncation dropped (max_length, sentence limits); plain encoding leaves 0


class Prompt:
    """A template and label words bound to a tokenizer and an LM kind (``mlm`` or ``causal``).

    >>> prompt = Prompt(PromptConfig("{sent_0} It was {mask}.", {"0": "bad", "1": "good"}), tok, "mlm")  # doctest: +SKIP
    >>> prompt.encode(["A fine film."])[0].answer_pos  # doctest: +SKIP
    6
    """

    def __init__(self, config: PromptConfig, tokenizer: Any, kind: str) -> None:
        if kind not in ("mlm", "causal"):
            raise ValueError(f"kind must be 'mlm' or 'causal', got {kind!r}")
        self.config = config
        self.tokenizer = tokenizer
        self.kind = kind
        self.template = Template.parse(config.template)
        self.labels: list[str] = list(config.labels or [])
        self.parts = self._usable_parts()
        mask = self.template.parts[self.template.mask_index]
        self.label_word_ids, self.word_to_class = self._label_word_ids(mask.space)
        self._literal_cache: dict[str, list[int]] = {}

    # -- construction ---------------------------------------------------------------------
    def _usable_parts(self) -> tuple[Part, ...]:
        """Drop what a decoder cannot use (the mask and everything after it)."""
        parts = self.template.parts
        if self.kind == "mlm":
            if self.tokenizer.mask_token_id is None:
                raise ValueError("this tokenizer has no mask token, so it cannot serve a masked-LM prompt")
            return parts
        idx = self.template.mask_index
        dropped = parts[idx + 1 :]
        if any(p.kind == "sent" for p in dropped):
            raise ValueError(
                f"template {self.template.source!r} puts a sentence after the mask, but a decoder LM answers at the "
                f"mask and never sees what follows; use a template with the mask last, e.g. "
                f"{decoder_template(self.template.source)!r}"
            )
        if any(p.kind not in ("sep",) for p in dropped):
            logger.info(
                "decoder LM: the template text after the mask (%r) cannot influence the answer and is dropped",
                Template(parts=dropped).to_readable(),
            )
        kept = parts[:idx]
        if not any(p.kind == "sent" for p in kept):
            raise ValueError(
                f"template {self.template.source!r}: a decoder LM answers at the mask and sees only what precedes "
                "it, but no sentence comes before the mask; move {mask} after the sentence"
            )
        return kept

    def _label_word_ids(self, space: bool) -> tuple[list[int], list[int]]:
        """Tokenize every label word to exactly one id, refusing words that are not one token."""
        ids: list[int] = []
        word_to_class: list[int] = []
        unk = getattr(self.tokenizer, "unk_token_id", None)
        for cls_index, label in enumerate(self.labels):
            for word in self.config.label_words[label]:
                text = (" " + word.strip()) if space else word.strip()
                tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                if len(tokens) != 1 or (unk is not None and tokens[0] == unk):
                    pieces = self.tokenizer.convert_ids_to_tokens(tokens)
                    raise ValueError(
                        f"label word {word!r} (class {label!r}) is not a single token of the model's vocabulary "
                        f"(it tokenizes as {pieces}); choose a word that is one token"
                    )
                ids.append(int(tokens[0]))
                word_to_class.append(cls_index)
        if len(set(ids)) != len(ids):
            raise ValueError(f"two classes share a label word token: {self.config.label_words}")
        return ids, word_to_class

    # -- encoding -------------------------------------------------------------------------
    def _special(self, kind: str) -> list[int]:
        """Id of cls/sep for this tokenizer (a decoder falls back to bos/eos, or nothing)."""
        tok = self.tokenizer
        if kind == "cls":
            value = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        else:
            value = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        if self.kind == "causal" and kind == "cls":
            value = tok.bos_token_id
        return [] if value is None else [int(value)]

    def _default_wrap(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer itself puts around one sequence (BERT: [CLS] … [SEP])."""
        core = list(self.tokenizer("x", add_special_tokens=False)["input_ids"])
        full = list(self.tokenizer("x")["input_ids"])
        at = next((i for i in range(len(full) - len(core) + 1) if full[i : i + len(core)] == core), 0)
        prefix, suffix = full[:at], full[at + len(core) :]
        if self.kind == "causal":
            suffix = []
            bos = self.tokenizer.bos_token_id
            if not prefix and bos is not None and getattr(self.tokenizer, "add_bos_token", False):
                prefix = [int(bos)]
        return prefix, suffix

    def _literal(self, text: str) -> list[int]:
        """Tokenize a literal template piece once and remember it."""
        if text not in self._literal_cache:
            self._literal_cache[text] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._literal_cache[text]

    def encode(self, examples: Sequence[Example | str | tuple[str, str]]) -> list[Encoded]:
        """Tokenize a batch of examples into prompts that fit ``max_length`` with the answer inside."""
        rows = [example_texts(ex, self.template.num_sentences) for ex in examples]
        slots = sorted({p.index for p in self.parts if p.kind == "sent"})
        sent_tokens: dict[tuple[int, int], list[int]] = {}
        for slot in slots:
            part_for_slot = [p for p in self.parts if p.kind == "sent" and p.index == slot]
            for part in part_for_slot:
                texts = [part.render(row) for row in rows]
                tokenized = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
                for r, toks in enumerate(tokenized):
                    sent_tokens[(r, id(part))] = list(toks)
        prefix, suffix = ([], []) if self.template.has_special_tokens else self._default_wrap()
        return [self._assemble(r, sent_tokens, prefix, suffix) for r in range(len(rows))]

    def _assemble(self, r: int, sent_tokens: dict[tuple[int, int], list[int]], prefix: list[int], suffix: list[int]) -> Encoded:
        """Lay out one example's parts, truncating sentences (never the template) to fit."""
        pieces: list[tuple[Part, list[int]]] = []
        for part in self.parts:
            if part.kind == "sent":
                pieces.append((part, sent_tokens[(r, id(part))]))
            elif part.kind == "text":
                pieces.append((part, self._literal(part.text)))
            elif part.kind == "mask":
                pieces.append((part, [int(self.tokenizer.mask_token_id)]))
            elif part.kind == "label":
                if part.index >= len(self.labels):
                    raise ValueError(f"template uses label_{part.index} but there are only {len(self.labels)} labels")
                word = self.config.label_words[self.labels[part.index]][0]
                pieces.append((part, self._literal((" " if part.space else "") + word)))
            else:
                pieces.append((part, self._special(part.kind)))
        fixed = len(prefix) + len(suffix) + sum(len(t) for p, t in pieces if p.kind != "sent")
        budget = self.config.max_length - fixed
        if budget < 1:
            raise ValueError(f"max_length {self.config.max_length} leaves no room for the sentence after the template's {fixed} tokens")
        sent_idx = [i for i, (p, _) in enumerate(pieces) if p.kind == "sent"]
        lengths = [len(pieces[i][1]) for i in sent_idx]
        for j, i in enumerate(sent_idx):
            limit = self.config.first_sent_limit if pieces[i][0].index == 0 else self.config.other_sent_limit
            if limit is not None:
                lengths[j] = min(lengths[j], limit)
        lengths = _fit_lengths(lengths, budget)
        cut = sum(len(pieces[i][1]) for i in sent_idx) - sum(lengths)
        ids: list[int] = list(prefix)
        types: list[int] = [0] * len(prefix)
        segment = 0
        answer = -1
        for j_piece, (part, toks) in enumerate(pieces):
            if part.kind == "sent":
                keep = lengths[sent_idx.index(j_piece)]
                toks = toks[len(toks) - keep :] if self.config.truncate_head else toks[:keep]
            if part.kind == "mask":
                answer = len(ids)
            ids.extend(toks)
            types.extend([segment] * len(toks))
            if part.kind == "sep" and part.new_segment:
                segment += 1
        ids.extend(suffix)
        types.extend([segment] * len(suffix))
        if self.kind == "causal":
            answer = len(ids) - 1
        return Encoded(input_ids=ids, token_type_ids=types, answer_pos=answer, cut=cut)


def _fit_lengths(lengths: list[int], budget: int) -> list[int]:
    """Shorten the longest sentences first until their total fits the budget."""
    lengths = list(lengths)
    while sum(lengths) > budget:
        longest = max(range(len(lengths)), key=lambda k: lengths[k])
        excess = sum(lengths) - budget
        others = sorted((v for k, v in enumerate(lengths) if k != longest), reverse=True)
        floor = others[0] if others else 0
        lengths[longest] -= max(1, min(excess, lengths[longest] - floor))
    return lengths


def example_texts(example: Any, needed: int) -> list[str]:
    """Get ``[text]`` or ``[text, text_b]`` from an Example, a str or a tuple, refusing empty text."""
    if isinstance(example, str):
        texts = [example]
    elif isinstance(example, (tuple, list)):
        texts = list(example)
    else:
        texts = [example.text] + ([example.text_b] if getattr(example, "text_b", None) is not None else [])
    for t in texts:
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"empty text in example {example!r}")
    if len(texts) < needed:
        raise ValueError(f"the template needs {needed} texts (text and text_b) but the example {example!r} has {len(texts)}")
    return texts
