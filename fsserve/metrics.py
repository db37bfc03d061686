"""Task metrics of the LM-BFF protocol: accuracy, binary F1, Matthews correlation, Pearson correlation.

Written with numpy alone (no sklearn), so the torch-free serving install can score too; labels are
compared by name, so ``1``, ``np.int64(1)`` and ``"1"`` are the same label.

>>> compute_metric("acc", [1, 0, 1], ["1", "1", "1"])
0.6666666666666666
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

METRICS = ("acc", "f1", "mcc", "pearson")


def _pair_arrays(predictions: Sequence, references: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Check the two sequences match in length and are non-empty, and return them as arrays."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if len(references) == 0:
        raise ValueError("no predictions to score")
    return np.asarray(list(predictions), dtype=object), np.asarray(list(references), dtype=object)


def _as_names(values: np.ndarray) -> np.ndarray:
    """Compare labels by name, so ints 1, numpy ints and "1" all count as the same label."""
    return np.array([str(v) for v in values])


def _mcc(pred: np.ndarray, ref: np.ndarray) -> float:
    """Matthews correlation for any number of classes (Gorodkin's form); 0 where it is undefined."""
    classes = np.unique(np.concatenate([pred, ref]))
    index = {c: i for i, c in enumerate(classes)}
    confusion = np.zeros((len(classes), len(classes)))
    np.add.at(confusion, ([index[c] for c in ref], [index[c] for c in pred]), 1)
    true_per_class, pred_per_class = confusion.sum(axis=1), confusion.sum(axis=0)
    n, correct = confusion.sum(), np.trace(confusion)
    numerator = correct * n - true_per_class @ pred_per_class
    denominator = math.sqrt((n * n - pred_per_class @ pred_per_class) * (n * n - true_per_class @ true_per_class))
    return float(numerator / denominator) if denominator else 0.0


def compute_metric(metric: str, predictions: Sequence, references: Sequence) -> float:
    """Score predictions with a task's metric (acc, binary f1 on "1", mcc, pearson) without sklearn."""
    pred, ref = _pair_arrays(predictions, references)
    if metric == "pearson":
        x, y = pred.astype(float), ref.astype(float)
        x, y = x - x.mean(), y - y.mean()
        denominator = math.sqrt(float(x @ x) * float(y @ y))
        if not denominator:
            logger.warning("pearson is undefined for constant values; returning 0.0")
            return 0.0
        return float(x @ y) / denominator
    pred, ref = _as_names(pred), _as_names(ref)
    if metric == "acc":
        return float(np.mean(pred == ref))
    if metric == "f1":
        true_pos = float(np.sum((pred == "1") & (ref == "1")))
        predicted, actual = float(np.sum(pred == "1")), float(np.sum(ref == "1"))
        return 2 * true_pos / (predicted + actual) if predicted + actual else 0.0
    if metric == "mcc":
        return _mcc(pred, ref)
    raise ValueError(f"unknown metric {metric!r}; expected one of {list(METRICS)}")
