"""Prompts: templates in both syntaxes, label words, and the encoding of examples with the answer position.

- ``templates``: parsing ``{sent_0} It was {mask}.`` and LM-BFF's ``*cls**sent_0*_It_was*mask*.*sep+*``
  into one internal form (:class:`Template`, :class:`Part`), label words, decoder rewrites;
- ``prompt``: :class:`Prompt`, a template and label words bound to a tokenizer, encoding examples
  into :class:`Encoded` rows (ids, token types, answer position) with LM-BFF's truncation;
- ``plain``: the template-free inputs of standard fine-tuning.

May import: ``fsserve.config``, ``fsserve.data`` and the tokenizer it is handed; never torch, never a
model: bundles encode with it on onnxruntime alone.

>>> from fsserve.prompts import Template
>>> Template.parse("{sent_0} It was {mask}.").num_sentences
1
"""

from __future__ import annotations

from fsserve.prompts.prompt import Encoded, Prompt, example_texts
from fsserve.prompts.templates import Part, Template, decoder_template, parse_label_words

__all__ = ["Encoded", "Part", "Prompt", "Template", "decoder_template", "example_texts", "parse_label_words"]
