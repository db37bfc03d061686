"""Templates and label-word specs: parse both template syntaxes into one list of :class:`Part`.

* readable: ``"{sent_0} It was {mask}."``, ``"{sent_0} ? {mask} , {+sentl_1}"``; placeholders are
  ``{cls} {sep} {sep+} {mask} {sent_i} {+sent_i} {sent-_i} {sentl_i} {sentu_i} {label_i}`` and
  everything else is literal text (``{{``/``}}`` for braces);
* LM-BFF's: ``"*cls**sent_0*_It_was*mask*.*sep+*"``: parts between ``*``, ``_`` is a space.

Whitespace right before a part moves into that part as its ``space`` flag, as in LM-BFF, so a
BPE tokenizer sees ``" great"`` as one word and never a lone space token. Encoding a template
with a tokenizer is :class:`fsserve.prompts.Prompt`'s job.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_PLACEHOLDER = re.compile(r"^(?P<space>\+?)(?P<name>cls|sep\+?|mask|sent|label)(?P<mod>[-lu]?)(?:_(?P<index>\d+))?$")


@dataclass(frozen=True)
class Part:
    """One piece of a template: literal text, a sentence slot, the mask, a label word or a special token."""

    kind: str  # "text" | "sent" | "mask" | "label" | "cls" | "sep"
    text: str = ""
    index: int = 0
    space: bool = False
    modifier: str = ""  # sent only: "-" drop last char, "l" lower-case first char, "u" upper-case it
    new_segment: bool = False  # sep only: "sep+" starts the next token-type segment

    def render(self, sentences: Sequence[str]) -> str:
        """Return the text of a ``text`` or ``sent`` part for one example."""
        if self.kind == "text":
            return self.text
        if self.kind != "sent":
            raise ValueError(f"part {self.kind!r} has no text")
        if self.index >= len(sentences) or sentences[self.index] is None:
            raise ValueError(f"the template uses sent_{self.index} but the example has no text for it")
        text = sentences[self.index].strip()
        if self.modifier == "-" and text:
            text = text[:-1].rstrip()
        elif self.modifier == "l" and text:
            text = text[0].lower() + text[1:]
        elif self.modifier == "u" and text:
            text = text[0].upper() + text[1:]
        return (" " + text) if self.space else text


@dataclass(frozen=True)
class Template:
    """A parsed template: the one internal form behind both syntaxes.

    >>> Template.parse("{sent_0} It was {mask}.") == Template.parse("*sent_0*_It_was*mask*.")
    True
    """

    parts: tuple[Part, ...]
    source: str = ""
    syntax: str = "readable"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Template) and self.parts == other.parts

    def __hash__(self) -> int:
        return hash(self.parts)

    @staticmethod
    def detect_syntax(template: str) -> str:
        """Tell LM-BFF syntax (``*mask*``) from the readable one (``{mask}``)."""
        if re.search(r"\*\+?(mask|cls|sep\+?|sent[-lu]?_\d+|label_\d+)\*", template):
            return "lmbff"
        return "readable"

    @classmethod
    def parse(cls, template: str) -> Template:
        """Parse either syntax; refuse a template without exactly one mask or with a bad placeholder."""
        if not isinstance(template, str) or not template.strip():
            raise ValueError("template must be a non-empty string")
        syntax = cls.detect_syntax(template)
        raw = _parse_lmbff(template) if syntax == "lmbff" else _parse_readable(template)
        parts = _attach_spaces(raw)
        masks = sum(p.kind == "mask" for p in parts)
        if masks != 1:
            where = "{mask}" if syntax == "readable" else "*mask*"
            raise ValueError(f"template {template!r} must contain exactly one {where}, found {masks}")
        if not any(p.kind == "sent" for p in parts):
            raise ValueError(f"template {template!r} has no sentence slot ({{sent_0}} or *sent_0*)")
        return cls(parts=tuple(parts), source=template, syntax=syntax)

    @property
    def num_sentences(self) -> int:
        """How many input texts the template reads (1 for single-sentence tasks, 2 for pairs)."""
        return 1 + max(p.index for p in self.parts if p.kind == "sent")

    @property
    def has_special_tokens(self) -> bool:
        """Say whether the template places cls/sep itself (LM-BFF style) rather than relying on defaults."""
        return any(p.kind in ("cls", "sep") for p in self.parts)

    @property
    def mask_index(self) -> int:
        """Position of the mask in ``parts``."""
        return next(i for i, p in enumerate(self.parts) if p.kind == "mask")

    def to_readable(self) -> str:
        """Write the template back in the readable syntax."""
        out = []
        for p in self.parts:
            lead = " " if p.space and p.kind not in ("sent",) else ""
            if p.kind == "text":
                out.append(p.text.replace("{", "{{").replace("}", "}}"))
            elif p.kind == "sent":
                out.append("{" + ("+" if p.space else "") + f"sent{p.modifier}_{p.index}" + "}")
            elif p.kind == "label":
                out.append(lead + "{" + f"label_{p.index}" + "}")
            elif p.kind == "sep":
                out.append(lead + ("{sep+}" if p.new_segment else "{sep}"))
            else:
                out.append(lead + "{" + p.kind + "}")
        return "".join(out)


def _placeholder(token: str, template: str) -> Part:
    """Turn one placeholder name (``+sentl_1``, ``mask``, ``sep+``) into a Part."""
    m = _PLACEHOLDER.match(token)
    if m is None:
        raise ValueError(f"unknown placeholder {token!r} in template {template!r}")
    name, mod, index = m.group("name"), m.group("mod"), m.group("index")
    space = bool(m.group("space"))
    if name in ("sent", "label"):
        if index is None:
            raise ValueError(f"placeholder {token!r} in template {template!r} needs an index, e.g. {name}_0")
        if name == "label" and mod:
            raise ValueError(f"placeholder {token!r}: modifiers apply to sentences only")
        return Part(kind=name, index=int(index), space=space, modifier=mod)
    if mod or index is not None:
        raise ValueError(f"unknown placeholder {token!r} in template {template!r}")
    if name.startswith("sep"):
        return Part(kind="sep", space=space, new_segment=name.endswith("+"))
    return Part(kind=name, space=space)


def _parse_readable(template: str) -> list[Part]:
    """Split ``"{sent_0} It was {mask}."`` into parts; ``{{``/``}}`` are literal braces."""
    parts: list[Part] = []
    buf: list[str] = []
    i = 0
    while i < len(template):
        ch = template[i]
        if template.startswith("{{", i) or template.startswith("}}", i):
            buf.append(ch)
            i += 2
            continue
        if ch == "{":
            end = template.find("}", i)
            if end < 0:
                raise ValueError(f"unclosed '{{' at position {i} in template {template!r}")
            if buf:
                parts.append(Part(kind="text", text="".join(buf)))
                buf = []
            parts.append(_placeholder(template[i + 1 : end].strip(), template))
            i = end + 1
            continue
        if ch == "}":
            raise ValueError(f"unmatched '}}' at position {i} in template {template!r}")
        buf.append(ch)
        i += 1
    if buf:
        parts.append(Part(kind="text", text="".join(buf)))
    return parts


def _parse_lmbff(template: str) -> list[Part]:
    """Split LM-BFF's ``*cls**sent_0*_It_was*mask*.*sep+*`` into parts (``_`` is a space)."""
    parts: list[Part] = []
    for chunk in template.split("*"):
        if not chunk:
            continue
        if _PLACEHOLDER.match(chunk):
            part = _placeholder(chunk, template)
            if part.kind == "mask":
                # LM-BFF tokenizes every label word with a leading space (Ġgreat).
                part = Part(kind="mask", space=True)
            parts.append(part)
        else:
            parts.append(Part(kind="text", text=chunk.replace("_", " ")))
    return parts


def _attach_spaces(parts: list[Part]) -> list[Part]:
    """Move trailing whitespace of a text part into the next part's ``space`` flag (LM-BFF's form)."""
    out: list[Part] = []
    for i, part in enumerate(parts):
        if part.kind == "text" and i + 1 < len(parts) and parts[i + 1].kind in ("mask", "sent", "label"):
            stripped = part.text.rstrip()
            if stripped != part.text:
                nxt = parts[i + 1]
                parts[i + 1] = Part(nxt.kind, nxt.text, nxt.index, True, nxt.modifier, nxt.new_segment)
                part = Part(kind="text", text=stripped)
        if part.kind == "text" and not part.text:
            continue
        out.append(part)
    return out


def decoder_template(template: str) -> str:
    """Rewrite a template whose sentences follow the mask so the mask comes last (for decoder LMs).

    ``*cls**sent-_0*?*mask*,*+sentl_1**sep+*`` becomes ``{cls}{sent-_0}?{+sentl_1}?{mask}``.
    """
    parsed = Template.parse(template)
    idx = parsed.mask_index
    if not any(p.kind == "sent" for p in parsed.parts[idx + 1 :]):
        return template
    before = list(parsed.parts[:idx])
    after = [p for p in parsed.parts[idx + 1 :] if p.kind != "sep"]
    while after and after[0].kind == "text" and after[0].text.strip() in {",", ".", ":", ";"}:
        after = after[1:]
    if after and after[0].kind == "sent" and not after[0].space:
        first = after[0]
        after[0] = Part(first.kind, first.text, first.index, True, first.modifier, first.new_segment)
    mask = parsed.parts[idx]
    body = Template(parts=tuple(before + after + [Part(kind="text", text="?"), mask]))
    return body.to_readable()


def parse_label_words(spec: str) -> dict[str, list[str]]:
    """Parse the CLI form ``"0:terrible,1:great"`` (``|`` separates several words of one class)."""
    result: dict[str, list[str]] = {}
    for item in spec.split(","):
        if ":" not in item:
            raise ValueError(f"label word {item!r} must look like LABEL:WORD (e.g. 0:terrible)")
        label, words = item.split(":", 1)
        label = label.strip()
        if label in result:
            raise ValueError(f"label {label!r} appears twice in {spec!r}")
        result[label] = [w.strip() for w in words.split("|") if w.strip()]
        if not result[label]:
            raise ValueError(f"label {label!r} has no word in {spec!r}")
    return result
