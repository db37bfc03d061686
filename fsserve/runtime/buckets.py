"""Static shapes for captured graphs: batch and sequence buckets, padding up to them, splitting what is larger.

A CUDA graph replays fixed shapes, so every call is mapped onto one of a few (batch bucket ×
sequence bucket) shapes: the batch is padded with rows that attend to nothing, the sequence with
pad tokens under a zero attention mask, and the result is cut back to the real rows. A batch
larger than the largest batch bucket is split into chunks; a sequence longer than the largest
sequence bucket is refused (the prompt truncates to its ``max_length``, so :meth:`BucketPlan.covering`
extends the buckets to it: a longer row can only come from a caller that skipped the prompt).

This module is numpy only, so the plan is tested on any machine (the CPU twin of the GPU path).

>>> plan = BucketPlan(batch=(1, 2, 4, 8), seq=(32, 64))
>>> plan.shape(3, 40)
(4, 64)
>>> [(c.start, c.stop) for c in plan.chunks(11)]
[(0, 8), (8, 11)]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_SEQ_BUCKETS = (32, 64, 128, 256)
# Pad sequence buckets to a multiple of this when a prompt's max_length needs a bucket of its own.
SEQ_ALIGN = 32


def batch_buckets_up_to(max_rows: int, buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS) -> tuple[int, ...]:
    """The batch buckets a caller that never sends more than ``max_rows`` rows needs: the smaller ones, then ``max_rows``.

    A Predictor with ``batch_size=32`` never hands the backend 64 rows, so capturing a 64-row graph
    would only cost load time and pool memory (the largest graph sets the pool's size).
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    return tuple(b for b in _sizes(buckets, "batch") if b < max_rows) + (int(max_rows),)


def _sizes(values: Sequence[int], what: str) -> tuple[int, ...]:
    """Sorted, distinct, positive bucket sizes, or a ValueError naming the bad ones."""
    try:
        sizes = tuple(sorted({int(v) for v in values}))
    except (TypeError, ValueError):
        raise ValueError(f"{what} buckets must be integers, got {values!r}") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"{what} buckets must be positive integers, got {list(values)!r}")
    return sizes


@dataclass(frozen=True)
class BucketPlan:
    """The (batch, sequence) shapes a graph backend captures, and how a call maps onto them."""

    batch: tuple[int, ...] = DEFAULT_BATCH_BUCKETS
    seq: tuple[int, ...] = DEFAULT_SEQ_BUCKETS

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch", _sizes(self.batch, "batch"))
        object.__setattr__(self, "seq", _sizes(self.seq, "sequence"))

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """Every (batch, sequence) shape, smallest first: what ``warmup`` captures."""
        return [(b, s) for s in self.seq for b in self.batch]

    def covering(self, max_length: int) -> BucketPlan:
        """The same plan with one more sequence bucket if the prompt's ``max_length`` exceeds the largest."""
        if max_length <= self.seq[-1]:
            return self
        aligned = -(-int(max_length) // SEQ_ALIGN) * SEQ_ALIGN
        return BucketPlan(self.batch, self.seq + (aligned,))

    def seq_bucket(self, length: int) -> int:
        """The smallest sequence bucket that holds ``length`` tokens; refuse a longer sequence."""
        for size in self.seq:
            if length <= size:
                return size
        raise ValueError(f"a sequence of {length} tokens is longer than the largest sequence bucket ({self.seq[-1]}): "
                         "encode with the prompt (it truncates to max_length) or add a larger bucket (seq_buckets)")

    def batch_bucket(self, rows: int) -> int:
        """The smallest batch bucket that holds ``rows`` rows (callers split first: see :meth:`chunks`)."""
        for size in self.batch:
            if rows <= size:
                return size
        raise ValueError(f"{rows} rows exceed the largest batch bucket ({self.batch[-1]}): split with chunks()")

    def shape(self, rows: int, length: int) -> tuple[int, int]:
        """The captured shape one chunk of ``rows`` × ``length`` runs in."""
        return self.batch_bucket(rows), self.seq_bucket(length)

    def chunks(self, rows: int) -> Iterator[slice]:
        """Consecutive row slices of at most the largest batch bucket each."""
        step = self.batch[-1]
        for start in range(0, rows, step):
            yield slice(start, min(start + step, rows))

    def fitting_batch(self, available: int, limit: int | None = None) -> int:
        """How many queued requests to take so the batch fills a bucket exactly (the batcher's choice).

        The largest bucket size not above ``available`` (and ``limit``); with fewer requests than
        the smallest bucket, all of them.
        """
        cap = min(available, limit) if limit is not None else available
        fits = [b for b in self.batch if b <= cap]
        return fits[-1] if fits else cap


def pad_to_shape(batch: dict[str, np.ndarray], rows: int, length: int, pad_token_id: int) -> dict[str, np.ndarray]:
    """Pad a right-padded batch to ``rows`` × ``length``: pad tokens under mask 0, extra rows attend to their first token.

    Extra rows get attention on position 0 only (an all-zero mask row gives NaNs in some attention
    implementations, and NaNs in a padding row are harmless to keep out of the graph anyway); their
    answer position is 0. Their outputs are cut off by the caller.
    """
    ids = np.asarray(batch["input_ids"])
    n, width = ids.shape
    if n > rows or width > length:
        raise ValueError(f"a {n} × {width} batch does not fit the {rows} × {length} bucket")
    out = {
        "input_ids": np.full((rows, length), pad_token_id, dtype=np.int64),
        "attention_mask": np.zeros((rows, length), dtype=np.int64),
        "answer_pos": np.zeros(rows, dtype=np.int64),
    }
    out["input_ids"][:n, :width] = ids
    out["attention_mask"][:n, :width] = batch["attention_mask"]
    out["attention_mask"][n:, 0] = 1
    out["answer_pos"][:n] = batch["answer_pos"]
    if batch.get("token_type_ids") is not None:
        out["token_type_ids"] = np.zeros((rows, length), dtype=np.int64)
        out["token_type_ids"][:n, :width] = batch["token_type_ids"]
    return out
