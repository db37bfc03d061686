"""Subsets of examples, drawn honestly: LM-BFF's k-shot splits and seeded, class-stratified samples.

A score on "the first N rows" of a file is a score on whatever order the file happens to be in:
LM-BFF's MR, CR, MPQA and Subj test files are sorted by label, so their first 400 rows are all one
class. Every ``--max-examples`` / ``max_test`` in fsserve therefore takes :func:`stratified_sample`:
each class (each score bin, for regression) keeps its share of the file, the draw is fixed by a
seed, and the returned :class:`Sample` says how it was drawn so a report can record it.

>>> pool = [Example(str(i), label="0" if i < 60 else "1") for i in range(100)]  # sorted by label
>>> sample = stratified_sample(pool, 10, seed=0)
>>> sample.strata, sample.record()["seed"]
({'0': 6, '1': 4}, 0)
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fsserve.data import Example, TaskSpec, get_task

logger = logging.getLogger(__name__)

DEFAULT_SEED = 0  # one fixed draw by default, so every model, method and split seed is scored on the same examples
REGRESSION_BINS = 5  # equal-width score bins a regression sample is stratified over (STS-B: 0-1, 1-2, ..., 4-5)


@dataclass(frozen=True)
class Sample:
    """A subset of examples and how it was drawn: what a report records beside a score on it.

    ``seed`` is None when nothing was left out (the whole population, in file order).
    """

    examples: list[Example]
    population: int
    seed: int | None
    strata: dict[str, int]

    def record(self) -> dict[str, Any]:
        """JSON-ready description (method, seed, size, population, per-stratum counts) for reports."""
        method = "all" if self.seed is None else "stratified"
        return {"method": method, "seed": self.seed, "size": len(self.examples), "population": self.population,
                "strata": dict(self.strata)}

    def __str__(self) -> str:
        return describe_sample(self.record())


def describe_sample(record: dict[str, Any]) -> str:
    """A sample record in words ("300 of 2000 examples, a stratified sample (seed 0)"), for reports read back from JSON."""
    if record.get("seed") is None:
        return f"all {record['population']} examples"
    return f"{record['size']} of {record['population']} examples, a stratified sample (seed {record['seed']})"


def _strata_keys(examples: Sequence[Example], spec: TaskSpec | None, bins: int) -> list[str]:
    """The stratum of every example: its label, a score bin for a float score, or "unlabelled"."""
    scores = [float(ex.label) for ex in examples if isinstance(ex.label, float)]
    if spec is not None and spec.is_regression and spec.label_range is not None:
        low, high = spec.label_range
    else:
        low, high = (min(scores), max(scores)) if scores else (0.0, 0.0)
    width = (high - low) / bins if high > low else 1.0
    keys = []
    for ex in examples:
        if isinstance(ex.label, float):
            i = min(max(int((ex.label - low) / width), 0), bins - 1)
            keys.append(f"score {low + i * width:g}-{low + (i + 1) * width:g}")
        else:
            keys.append("unlabelled" if ex.label is None else str(ex.label))
    return keys


def _quotas(counts: dict[str, int], n: int) -> dict[str, int]:
    """Split ``n`` over the strata in proportion to their sizes (largest remainder, ties by name)."""
    total = sum(counts.values())
    exact = {key: n * count / total for key, count in counts.items()}
    quotas = {key: math.floor(share) for key, share in exact.items()}
    left = n - sum(quotas.values())
    for key in sorted(counts, key=lambda k: (quotas[k] - exact[k], k))[:left]:
        quotas[key] += 1
    return quotas


def stratified_sample(examples: Sequence[Example], n: int | None, seed: int = DEFAULT_SEED, task: str | TaskSpec | None = None,
                      *, bins: int = REGRESSION_BINS) -> Sample:
    """Draw ``n`` examples with every class (or score bin) in its share of the whole, fixed by ``seed``.

    Scores on a subset then estimate the score on the whole file whatever its order. ``n`` None (or
    at least the population) keeps every example. The chosen examples keep their file order.
    Regression scores are binned over the task's label range (``task``), else over their own range.
    """
    if n is not None and n < 1:
        raise ValueError(f"a sample needs a positive size, got {n}")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    spec = get_task(task) if task is not None else None
    keys = _strata_keys(examples, spec, bins)
    counts = dict(sorted(Counter(keys).items()))
    if n is None or n >= len(examples):
        return Sample(list(examples), len(examples), None, counts)
    quotas = _quotas(counts, n)
    taken = dict.fromkeys(counts, 0)
    chosen = []
    for index in np.random.default_rng(seed).permutation(len(examples)):  # one permutation: no stratum order matters
        key = keys[index]
        if taken[key] < quotas[key]:
            taken[key] += 1
            chosen.append(int(index))
    logger.debug("stratified sample of %d from %d (seed %d): %s", n, len(examples), seed, taken)
    return Sample([examples[i] for i in sorted(chosen)], len(examples), int(seed), taken)


def _sampling_class(example: Example, spec: TaskSpec | None) -> str:
    """The class an example is balanced under when drawing k-shot splits (LM-BFF's generator rule)."""
    if isinstance(example.label, float):
        if spec is None or spec.median is None:
            raise ValueError(f"float label {example.label} needs a regression task to be sampled")
        return "0" if example.label < spec.median else "1"
    if example.label is None:
        raise ValueError(f"cannot sample unlabelled example {example.text[:40]!r}")
    return example.label


def sample_kshot(examples: Sequence[Example], labels: Sequence[str], k: int, seed: int, *,
                 task: str | TaskSpec | None = None) -> tuple[list[Example], list[Example]]:
    """Draw LM-BFF's balanced split: shuffle with the seed, first k of each label train, next k dev.

    Labels come out grouped in order of first appearance after the shuffle, as LM-BFF writes them, so
    drawing from an original train file reproduces LM-BFF's k-shot files. Regression examples are
    balanced over their median classes; pass ``task`` for them.
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    spec = get_task(task) if task is not None else None
    order = np.arange(len(examples))
    np.random.RandomState(seed).shuffle(order)  # the legacy generator LM-BFF seeded with np.random.seed
    by_label: dict[str, list[Example]] = {}
    for index in order:
        label = _sampling_class(examples[index], spec)
        if label not in labels:
            raise ValueError(f"unknown label {label!r} in examples; expected one of {list(labels)}")
        by_label.setdefault(label, []).append(examples[index])
    for label in labels:
        count = len(by_label.get(label, []))
        if count < k:
            raise ValueError(f"label {label!r} has {count} examples, fewer than k={k}")
        if count < 2 * k:
            logger.warning("label %r has %d examples: dev gets only %d of %d", label, count, count - k, k)
    train = [ex for group in by_label.values() for ex in group[:k]]
    dev = [ex for group in by_label.values() for ex in group[k:2 * k]]
    return train, dev
