"""DynamicBatcher on its own: batches that fill the graph backend's buckets, and every request its own rows."""

from __future__ import annotations

import asyncio

import numpy as np

from fsserve.serving.batcher import DynamicBatcher


def _run(bucket_sizes: tuple[int, ...] | None, requests: list[int], max_batch_size: int = 16) -> tuple[list[int], list[np.ndarray]]:
    """Submit requests of the given row counts at once; return the batch sizes the model saw and each request's answer."""
    seen: list[int] = []

    def predict(texts: list[str], texts_b: list[str] | None) -> np.ndarray:
        seen.append(len(texts))
        return np.array([[float(t)] for t in texts])

    async def main() -> list[np.ndarray]:
        batcher = DynamicBatcher(predict, max_batch_size=max_batch_size, max_queue_delay_ms=50, bucket_sizes=bucket_sizes)
        await batcher.start()
        start = 0
        calls = []
        for rows in requests:
            calls.append(batcher.submit([str(i) for i in range(start, start + rows)]))
            start += rows
        answers = await asyncio.gather(*calls)
        await batcher.close()
        return answers

    answers = asyncio.run(main())
    return seen, answers


def test_batches_fill_buckets_and_the_rest_waits_for_the_next() -> None:
    seen, answers = _run((1, 2, 4, 8), [1] * 11)
    assert seen == [8, 2, 1]
    assert [a.ravel().tolist() for a in answers] == [[float(i)] for i in range(11)]


def test_without_buckets_one_batch_takes_all_that_fits() -> None:
    seen, _ = _run(None, [1] * 11)
    assert seen == [11]


def test_multi_row_requests_stay_whole_and_get_their_own_rows() -> None:
    seen, answers = _run((1, 2, 4, 8), [3, 3, 3, 2])
    assert sum(seen) == 11 and all(n <= 8 for n in seen) and seen[0] == 6  # 3 + 3 fit the 8-row bucket, a third 3 would not
    assert [a.ravel().tolist() for a in answers] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0], [9.0, 10.0]]


def test_with_no_delay_a_lone_request_runs_at_once_and_a_batch_forms_while_the_model_is_busy() -> None:
    import threading

    seen: list[int] = []
    release = threading.Event()

    def predict(texts: list[str], texts_b: list[str] | None) -> np.ndarray:
        seen.append(len(texts))
        if len(seen) == 1:
            release.wait(5)  # the first batch holds the model until the others have queued
        return np.array([[float(t)] for t in texts])

    async def main() -> list[np.ndarray]:
        batcher = DynamicBatcher(predict, max_batch_size=16)  # the default queue delay: 0
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit(["0"]))
        while not seen:  # the lone request went to the model without waiting for company
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(batcher.submit([str(i)])) for i in range(1, 11)]
        await asyncio.sleep(0.05)
        release.set()
        answers = await asyncio.gather(first, *rest)
        await batcher.close()
        return answers

    answers = asyncio.run(asyncio.wait_for(main(), 10))
    assert seen == [1, 10]  # the ten that queued behind the busy model ran as one batch
    assert [a.ravel().tolist() for a in answers] == [[float(i)] for i in range(11)]
