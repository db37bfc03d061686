"""Plain-text inputs for standard fine-tuning: the text (and text_b) as the tokenizer makes them, no template.

Standard fine-tuning classifies the first token (encoders: CLS) or the last one (decoders) with a
linear head. The torch model and the torch-free onnx bundle encode through this one function, so a
fine-tuned model predicts the same from either; it works with an HF tokenizer and with the bundle's
``tokenizers``-only adapter (:class:`fsserve.bundle.BundleTokenizer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fsserve.prompts import Encoded, example_texts


def encode_plain(tokenizer: Any, examples: Sequence[Any], num_sentences: int, max_length: int, kind: str) -> list[Encoded]:
    """Tokenize examples as plain text (pairs as the tokenizer joins them), truncated longest-first to max_length.

    >>> encode_plain(tok, ["A fine film."], 1, 128, "mlm")[0].answer_pos  # doctest: +SKIP
    0
    """
    if kind not in ("mlm", "causal"):
        raise ValueError(f"kind must be 'mlm' or 'causal', got {kind!r}")
    if not examples:
        return []
    rows = [example_texts(ex, num_sentences) for ex in examples]
    firsts = [r[0] for r in rows]
    seconds = [r[1] for r in rows] if num_sentences > 1 else None
    enc = tokenizer(firsts, seconds, truncation=True, max_length=max_length, return_token_type_ids=True)
    types = enc.get("token_type_ids")
    out = []
    for i, ids in enumerate(enc["input_ids"]):
        answer = 0 if kind == "mlm" else len(ids) - 1
        out.append(Encoded(input_ids=list(ids), token_type_ids=list(types[i]) if types else [0] * len(ids), answer_pos=answer))
    return out
