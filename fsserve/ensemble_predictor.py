"""The Predictor of prompt ensembles: every text encoded by every member prompt, one backend call per batch.

Kept free of torch at import time like fsserve.predictor, so an ensemble bundle predicts with
onnxruntime alone. The backend (the ensemble's ONNX graph, or ``PromptEnsemble`` on torch) takes P
example-major rows per text and returns one row of label logits per text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fsserve.predictor import Predictor, pad_batch
from fsserve.prompts import Encoded


class EnsemblePredictor(Predictor):
    """A Predictor whose backend takes P example-major rows per text and returns one row of logits per text.

    >>> predictor = Predictor.from_pretrained("bundles/sst2-ensemble", backend="onnx")  # doctest: +SKIP
    >>> predictor.predict("A triumph.")  # doctest: +SKIP
    '1'
    """

    def __init__(self, backend: Any, encoders: Sequence[Callable[[Sequence[Any]], list[Encoded]]], labels: Sequence[str], pad_token_id: int, num_sentences: int = 1, batch_size: int = 32) -> None:
        if not encoders:
            raise ValueError("an ensemble predictor needs at least one member prompt")
        super().__init__(backend, None, labels, pad_token_id, None, num_sentences, batch_size)
        self.encoders = list(encoders)

    @classmethod
    def from_model(cls, model: Any, device: str | None = None, batch_size: int = 32, **kwargs: Any) -> Predictor:
        """Wrap an in-memory PromptEnsemble with the torch backend."""
        from fsserve.ensemble import predictor

        return predictor(model, device=device, batch_size=batch_size, **kwargs)

    def label_logits(self, texts: str | Sequence[Any], texts_b: str | Sequence[str] | None = None) -> np.ndarray:
        """Ensemble (B, num_labels) logits: every text encoded by every prompt, batched by length."""
        rows, _ = self._rows(texts, texts_b)
        out = np.zeros((len(rows), len(self.labels)), dtype=np.float32)
        if not rows:
            return out
        per_prompt = [encode(rows) for encode in self.encoders]
        longest = [max(len(encoded[i].input_ids) for encoded in per_prompt) for i in range(len(rows))]
        order = sorted(range(len(rows)), key=longest.__getitem__)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            flat = [encoded[i] for i in idx for encoded in per_prompt]
            out[idx] = self.backend.label_logits(**pad_batch(flat, self.pad_token_id, self.with_token_types))
        return out


def load_ensemble_predictor(root: str | Path, config: dict[str, Any], backend: str = "onnx", device: str | None = None, batch_size: int = 32, **kwargs: Any) -> EnsemblePredictor:
    """Build the Predictor of a verified ensemble bundle (called by fsserve.bundle for bundles with ``ensemble``)."""
    from fsserve.bundle import TOKENIZER_DIR, BundleError, BundleTokenizer

    root = Path(root)
    if backend == "torch":
        if not config["manifest"].get("torch"):
            raise BundleError(f"{root} carries no torch weights: export it with torch_weights=True to load it with backend='torch'")
        from fsserve.ensemble import PromptEnsemble, predictor

        return predictor(PromptEnsemble.from_pretrained(root / config["manifest"]["torch"]), device=device, batch_size=batch_size, **kwargs)
    if backend != "onnx":
        raise ValueError(f"unknown backend {backend!r}: use 'onnx' or 'torch'")
    from fsserve.config import PromptConfig
    from fsserve.prompts import Prompt
    from fsserve.runtime.onnx import OnnxBackend

    tokenizer = BundleTokenizer.from_folder(root / TOKENIZER_DIR, config["tokenizer"])
    prompts = []
    for i, record in enumerate(config["ensemble"]["members"]):
        prompt = Prompt(PromptConfig.from_dict(record["prompt"]), tokenizer, config["kind"])
        if prompt.label_word_ids != record["label_word_ids"]:
            raise BundleError(f"{root / TOKENIZER_DIR}: member {i}'s label words tokenize to {prompt.label_word_ids}, the graph was exported for {record['label_word_ids']}")
        prompts.append(prompt)
    runner = OnnxBackend(root / config["manifest"]["graph"], device=device, **kwargs)
    num_sentences = max(p.template.num_sentences for p in prompts)
    return EnsemblePredictor(runner, [p.encode for p in prompts], config["labels"], int(config["pad_token_id"]), num_sentences, batch_size)
