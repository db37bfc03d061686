"""Predictor: prompt + batching + a backend → labels and probabilities.

Kept free of torch at import time: with the onnxruntime backend, prediction never imports torch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis (float64 inside, float32 out)."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def pad_batch(encoded: Sequence[Any], pad_token_id: int, with_token_types: bool) -> dict[str, np.ndarray]:
    """Right-pad encoded prompts into int64 arrays: input_ids, attention_mask, answer_pos (+ token_type_ids)."""
    width = max(len(e.input_ids) for e in encoded)
    ids = np.full((len(encoded), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(encoded), width), dtype=np.int64)
    types = np.zeros((len(encoded), width), dtype=np.int64)
    answer = np.empty(len(encoded), dtype=np.int64)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[i, :n] = e.input_ids
        mask[i, :n] = 1
        types[i, :n] = e.token_type_ids
        answer[i] = e.answer_pos
    batch = {"input_ids": ids, "attention_mask": mask, "answer_pos": answer}
    if with_token_types:
        batch["token_type_ids"] = types
    return batch


class Predictor:
    """Classify texts with a saved model or bundle, on the torch or onnxruntime backend.

    >>> predictor = Predictor.from_pretrained("runs/sst2")  # doctest: +SKIP
    >>> predictor.predict("A triumph.")  # doctest: +SKIP
    '1'
    >>> predictor.predict_proba(["A triumph.", "A mess."]).shape  # doctest: +SKIP
    (2, 2)
    """

    def __init__(
        self,
        backend: Any,
        encode: Any,
        labels: Sequence[str],
        pad_token_id: int,
        regression_range: Sequence[float] | None = None,
        num_sentences: int = 1,
        batch_size: int = 32,
        finetune_regression: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.backend = backend
        self.encode = encode
        self.labels = list(labels)
        self.pad_token_id = pad_token_id
        self.regression_range = list(regression_range) if regression_range else None
        self.num_sentences = num_sentences
        self.batch_size = batch_size
        self.finetune_regression = finetune_regression
        self.with_token_types = "token_type_ids" in getattr(backend, "input_names", [])

    @classmethod
    def from_pretrained(cls, path: str | Path, backend: str = "torch", device: str | None = None, batch_size: int = 32, **kwargs: Any) -> Predictor:
        """Load a saved model folder (torch) or an exported bundle (onnx or torch)."""
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"{path} is not a folder holding a saved fsserve model or bundle")
        if backend not in ("torch", "onnx"):
            raise ValueError(f"unknown backend {backend!r}: use 'torch' or 'onnx'")
        if (path / "manifest.json").is_file():
            from fsserve.bundle import load_bundle_predictor

            return load_bundle_predictor(path, backend=backend, device=device, batch_size=batch_size, **kwargs)
        if backend == "onnx":
            raise ValueError(f"{path} is a saved model, not an exported bundle: run `fsserve export` first for the onnx backend")
        from fsserve.modeling import PromptModel

        model = PromptModel.from_pretrained(path)
        return cls.from_model(model, device=device, batch_size=batch_size, **kwargs)

    @classmethod
    def from_model(cls, model: Any, device: str | None = None, batch_size: int = 32, **kwargs: Any) -> Predictor:
        """Wrap an in-memory PromptModel (e.g. right after training)."""
        from fsserve.runtime.torch import TorchBackend

        backend = TorchBackend(model, device=device, **kwargs)
        cfg = model.prompt_config
        return cls(
            backend,
            model.encode,
            model.labels,
            model.pad_token_id,
            cfg.regression_range,
            model.prompt.template.num_sentences,
            batch_size,
            finetune_regression=model.head_outputs == 1,
        )

    # -- prediction -----------------------------------------------------------------------
    def _rows(self, texts: str | Sequence[Any], texts_b: str | Sequence[str] | None) -> tuple[list[Any], bool]:
        """Normalise the many accepted input shapes into a list of rows; remember if one str was given."""
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        if texts_b is not None:
            seconds = [texts_b] if isinstance(texts_b, str) else list(texts_b)
            if len(seconds) != len(items):
                raise ValueError(f"got {len(items)} texts but {len(seconds)} texts_b")
            items = [(a, b) for a, b in zip(items, seconds)]
        elif self.num_sentences > 1:
            for item in items:
                if isinstance(item, str):
                    raise ValueError("this is a sentence-pair model: pass texts_b (or (text, text_b) tuples)")
        for item in items:
            parts = [item] if isinstance(item, str) else list(item) if isinstance(item, (tuple, list)) else [getattr(item, "text", None)]
            if not all(isinstance(p, str) and p.strip() for p in parts):
                raise ValueError(f"empty or non-string text in input: {item!r}")
        return items, single

    def label_logits(self, texts: str | Sequence[Any], texts_b: str | Sequence[str] | None = None) -> np.ndarray:
        """Raw (B, num_labels) label logits, batched by length."""
        rows, _ = self._rows(texts, texts_b)
        if not rows:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        encoded = self.encode(rows)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
        out: np.ndarray | None = None
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = pad_batch([encoded[i] for i in idx], self.pad_token_id, self.with_token_types)
            logits = np.asarray(self.backend.label_logits(**batch), dtype=np.float32)
            if out is None:
                out = np.empty((len(encoded), logits.shape[1]), dtype=np.float32)
            out[idx] = logits
        assert out is not None
        return out

    def _probs(self, logits: np.ndarray) -> np.ndarray:
        """Probabilities from logits (a sigmoid pair for a one-output regression head)."""
        if self.finetune_regression:
            high = 1.0 / (1.0 + np.exp(-logits[:, 0].astype(np.float64)))
            return np.stack([1 - high, high], axis=-1).astype(np.float32)
        return softmax(logits)

    def predict_proba(self, texts: str | Sequence[Any], texts_b: str | Sequence[str] | None = None) -> np.ndarray:
        """Class probabilities: (num_labels,) for one str, (B, num_labels) for a list."""
        _, single = self._rows(texts, texts_b)
        probs = self._probs(self.label_logits(texts, texts_b))
        return probs[0] if single else probs

    def predict(self, texts: str | Sequence[Any], texts_b: str | Sequence[str] | None = None) -> Any:
        """Predicted label (or regression value): one for a str, a list for a list."""
        _, single = self._rows(texts, texts_b)
        preds = self.labels_from_proba(self._probs(self.label_logits(texts, texts_b)))
        return preds[0] if single else preds

    def labels_from_proba(self, probs: np.ndarray) -> list[Any]:
        """Labels (or regression values) for (B, num_labels) probabilities, so callers need not run the model twice."""
        if self.regression_range:
            lo, hi = self.regression_range
            return [float(lo + (hi - lo) * p) for p in probs[:, 1]]
        return [self.labels[i] for i in probs.argmax(-1)]
