"""DynamicBatcher: groups concurrent requests for one model into batches, runs them off the event loop.

Requests that queued while the model ran the previous batch, or that arrive within
``max_queue_delay_ms`` of the oldest waiting one (default 0: a lone request never waits), run
together, up to ``max_batch_size`` rows; each request gets its own rows back. The queue is bounded (a full queue
raises QueueFull → RESOURCE_EXHAUSTED), a request whose deadline passed while waiting is dropped
from its batch, and a failing batch is retried request by request so one bad request cannot fail
the others.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fsserve.serving.status import DeadlineExceeded, InvalidInput, QueueFull, Unavailable

logger = logging.getLogger(__name__)

PredictFn = Callable[[list[str], "list[str] | None"], np.ndarray]


@dataclass
class _Waiting:
    """One submitted request while it waits for (and runs in) a batch."""

    texts: list[str]
    texts_b: list[str] | None
    future: asyncio.Future[np.ndarray]
    enqueued: float
    deadline: float | None = None
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.rows = len(self.texts)


class DynamicBatcher:
    """Run ``predict(texts, texts_b) -> (rows, ...) array`` on batches of concurrently submitted requests.

    >>> import numpy as np
    >>> async def demo():
    ...     batcher = DynamicBatcher(lambda t, b: np.ones((len(t), 2)), max_batch_size=8, max_queue_delay_ms=1)
    ...     await batcher.start()
    ...     rows = await batcher.submit(["a", "b"])
    ...     await batcher.close()
    ...     return rows.shape
    >>> asyncio.run(demo())
    (2, 2)
    """

    def __init__(self, predict: PredictFn, max_batch_size: int = 32, max_queue_delay_ms: float = 0.0, max_queue_size: int = 256, metrics: Any = None,
                 model: str = "model", bucket_sizes: Sequence[int] | None = None) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_queue_delay_ms < 0:
            raise ValueError("max_batch_size and max_queue_size must be at least 1 and max_queue_delay_ms not negative")
        self.bucket_sizes = sorted({int(b) for b in bucket_sizes or ()})
        self.predict = predict
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.metrics = metrics
        self.model = model
        self._pending: collections.deque[_Waiting] = collections.deque()
        self._pending_rows = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._draining = False
        self._closed = False

    @property
    def queued(self) -> int:
        """How many requests wait for a batch right now."""
        return len(self._pending)

    async def start(self) -> None:
        """Start the collecting task on the running loop and the thread the model runs in."""
        if self._task is not None:
            raise RuntimeError("batcher already started")
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"fsserve-{self.model}")
        self._task = asyncio.get_running_loop().create_task(self._collect(), name=f"batcher-{self.model}")

    async def submit(self, texts: list[str], texts_b: list[str] | None = None, timeout: float | None = None) -> np.ndarray:
        """Queue one request's rows and wait for their results; refuse when the queue is full or closing."""
        if self._task is None or self._wakeup is None:
            raise RuntimeError("batcher not started: await start() first")
        if self._closed:
            raise Unavailable("server is shutting down; not accepting new requests")
        if not texts or len(texts) > self.max_batch_size:
            raise InvalidInput(f"a request needs 1 to {self.max_batch_size} rows, got {len(texts)}")
        if len(self._pending) >= self.max_queue_size:
            raise QueueFull(f"model {self.model!r} has {len(self._pending)} requests queued (max_queue_size {self.max_queue_size}); retry later")
        loop = asyncio.get_running_loop()
        now = loop.time()
        item = _Waiting(texts, texts_b, loop.create_future(), now, None if timeout is None else now + timeout)
        self._pending.append(item)
        self._pending_rows += item.rows
        self._set_depth()
        self._wakeup.set()
        in_flight = self.metrics.in_flight.labels(model=self.model) if self.metrics is not None else None
        if in_flight is not None:
            in_flight.inc()
        try:
            return await item.future
        except asyncio.CancelledError:
            self._forget(item)  # the client went away (cancelled or past its deadline): no batch should run it
            raise
        finally:
            if in_flight is not None:
                in_flight.dec()

    def begin_drain(self) -> None:
        """Run what is queued without waiting out the queue delay (the server is stopping)."""
        self._draining = True
        if self._wakeup is not None:
            self._wakeup.set()

    async def close(self) -> None:
        """Finish every queued request, then stop the collecting task and the model thread."""
        self._closed = True
        self.begin_drain()
        if self._task is not None:
            await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # -- inside -------------------------------------------------------------------------------
    def _forget(self, item: _Waiting) -> None:
        """Take a request out of the queue if it is still there."""
        try:
            self._pending.remove(item)
        except ValueError:
            return
        self._pending_rows -= item.rows
        self._set_depth()

    def _set_depth(self) -> None:
        """Report the queue depth gauge."""
        if self.metrics is not None:
            self.metrics.queue_depth.labels(model=self.model).set(len(self._pending))

    async def _collect(self) -> None:
        """Wait for requests, gather a batch (full, or the oldest request's delay spent), run it; repeat."""
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            flush_at = self._pending[0].enqueued + self.max_queue_delay
            while self._pending and self._pending_rows < self.max_batch_size and not self._draining:
                remaining = flush_at - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take(loop.time())
            if batch:
                await self._execute(batch)

    def _row_budget(self) -> int:
        """Rows for the next batch: max_batch_size, or with buckets the largest bucket the queue fills."""
        cap = min(self._pending_rows, self.max_batch_size)
        fits = [b for b in self.bucket_sizes if b <= cap]
        return fits[-1] if fits else self.max_batch_size

    def _take(self, now: float) -> list[_Waiting]:
        """Pop the oldest requests that fit in one batch, dropping those already cancelled or past deadline."""
        batch: list[_Waiting] = []
        rows = 0
        budget = self._row_budget()
        while self._pending and (not batch or rows + self._pending[0].rows <= budget):
            item = self._pending.popleft()
            self._pending_rows -= item.rows
            if item.future.done():
                continue
            if item.deadline is not None and now >= item.deadline:
                item.future.set_exception(DeadlineExceeded(f"deadline passed after {now - item.enqueued:.3f}s in the queue; dropped from the batch"))
                logger.info("event=dropped_past_deadline model=%s rows=%d", self.model, item.rows)
                continue
            batch.append(item)
            rows += item.rows
        self._set_depth()
        return batch

    async def _execute(self, batch: list[_Waiting]) -> None:
        """Run one batch in the model thread and hand each request its rows (or its error)."""
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        start = loop.time()
        texts = [t for item in batch for t in item.texts]
        pairs = batch[0].texts_b is not None
        texts_b = [t for item in batch for t in (item.texts_b or [])] if pairs else None
        try:
            out = await loop.run_in_executor(self._executor, self.predict, texts, texts_b)
        except Exception as exc:  # noqa: BLE001 - isolate the request that broke the batch
            if len(batch) > 1:
                logger.warning("event=batch_failed model=%s requests=%d error=%r retry=one_by_one", self.model, len(batch), exc)
                for item in batch:
                    await self._execute([item])
                return
            logger.exception("event=request_failed model=%s rows=%d", self.model, batch[0].rows)
            if not batch[0].future.done():
                batch[0].future.set_exception(exc)
            return
        seconds = loop.time() - start
        if self.metrics is not None:
            self.metrics.batch_size.labels(model=self.model).observe(len(texts))
            self.metrics.inference_seconds.labels(model=self.model).observe(seconds)
            for item in batch:
                self.metrics.queue_seconds.labels(model=self.model).observe(start - item.enqueued)
        logger.debug("event=batch model=%s requests=%d rows=%d seconds=%.4f", self.model, len(batch), len(texts), seconds)
        offset = 0
        for item in batch:
            if not item.future.done():
                item.future.set_result(out[offset : offset + item.rows])
            offset += item.rows
