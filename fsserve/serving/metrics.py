"""Prometheus metrics of one server: requests, errors by code, batch sizes, queue and inference time.

Each server owns its registry (not prometheus_client's global one), so several servers can live in
one process (tests, notebooks) without clashing metric names.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    """The metric families a server updates, and the HTTP endpoint that exposes them.

    >>> metrics = ServerMetrics()
    >>> metrics.batch_size.labels(model="sst2").observe(4)
    >>> b"fsserve_batch_size_count" in metrics.render()
    True
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("fsserve_requests", "gRPC requests answered, by method and status code", ["method", "code"], registry=self.registry)
        self.errors = Counter("fsserve_errors", "gRPC requests answered with an error, by method and status code", ["method", "code"], registry=self.registry)
        self.batch_size = Histogram("fsserve_batch_size", "Rows per executed batch", ["model"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue_seconds = Histogram("fsserve_queue_seconds", "Time a request waited in the batcher before its batch ran", ["model"], buckets=SECONDS_BUCKETS, registry=self.registry)
        self.inference_seconds = Histogram("fsserve_inference_seconds", "Time to run one batch through the model", ["model"], buckets=SECONDS_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("fsserve_queue_depth", "Requests waiting in the batcher", ["model"], registry=self.registry)
        self._http: Any = None
        self._thread: Any = None

    def record_request(self, method: str, code: str) -> None:
        """Count one answered request (and, when it failed, one error) under its method and status code."""
        self.requests.labels(method=method, code=code).inc()
        if code != "OK":
            self.errors.labels(method=method, code=code).inc()

    def render(self) -> bytes:
        """The metrics in Prometheus text format, as the HTTP endpoint serves them."""
        return generate_latest(self.registry)

    def serve_http(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP on host:port (0 picks a free port) and return the bound port."""
        from prometheus_client import start_http_server

        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._http.server_port)
        logger.info("event=metrics_listening host=%s port=%d", host, bound)
        return bound

    def close(self) -> None:
        """Stop the HTTP endpoint, if one was started."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._http = self._thread = None


def histogram_counts(text: str, name: str, label: str | None = None) -> dict[str, float]:
    """Read one histogram's cumulative bucket counts (``le`` → count) from Prometheus text, e.g. to check batching."""
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(f"{name}_bucket{{"):
            continue
        labels, _, value = line.rpartition(" ")
        if label is not None and label not in labels:
            continue
        le = labels.split('le="', 1)[1].split('"', 1)[0]
        counts[le] = counts.get(le, 0.0) + float(value)
    return counts
