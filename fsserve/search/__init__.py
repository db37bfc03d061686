"""Automatic prompts (LM-BFF §5) and prompt ensembles.

- ``label_words``: label-word search (top-k words per class from the LM, combinations scored on
  train, re-ranked on dev) and the shared scoring of candidate prompts;
- ``templates``: template generation with T5 span filling or a decoder LM;
- ``ensemble``: :class:`PromptEnsemble`, several prompts averaged and exported as one graph.

May import the model and training layers (``fsserve.modeling``, ``fsserve.training``) and the
exporters (lazily, to export an ensemble); never the predictor, serving or the CLI: the predictor
loads ensemble bundles without this package unless the torch backend is asked for.
Names are imported lazily: ``import fsserve.search`` does not import torch.

>>> from fsserve.search import search_label_words, PromptEnsemble  # doctest: +SKIP
"""

from __future__ import annotations

from fsserve.utils.lazy import lazy_exports

_LABEL_WORDS = ("LabelWordsCandidate", "answer_logits", "class_targets", "prompts_for", "rerank", "score_combinations",
                "score_prompts", "search_label_words", "top_words_per_class", "vocab_projection", "whole_word_mask")
_LAZY = {name: "fsserve.search.label_words" for name in _LABEL_WORDS}
_LAZY |= {name: "fsserve.search.templates" for name in ("TemplateCandidate", "decoder_templates", "t5_templates")}
_LAZY |= {name: "fsserve.search.ensemble" for name in ("EncodedGroup", "PromptEnsemble")}

__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
