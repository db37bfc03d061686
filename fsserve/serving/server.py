"""InferenceServer: the gRPC server around the servicer — ports, TLS, auth, health, reflection,
Prometheus metrics, drain — and, on ``http_port``, the same servicer over HTTP/REST (http_server.py).

Each server owns its metrics registry (not prometheus_client's global one), so several servers can
live in one process (tests, notebooks) without clashing metric names.

Shutdown order (SIGTERM/SIGINT, or ``stop()``): health says NOT_SERVING and ServerReady false; the
batchers stop waiting out their queue delay; gRPC and HTTP refuse new calls and let accepted ones
finish (up to ``grace_period_s``); then the batchers and the metrics endpoint stop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from google.protobuf import descriptor_pool
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from fsserve.serving.config import MAX_MESSAGE_BYTES, ServerConfig
from fsserve.serving.protos import grpc_predict_v2_pb2 as pb
from fsserve.serving.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from fsserve.serving.servicer import InferenceServicer, ServedModel
from fsserve.serving.status import StatusInterceptor, TokenAuthInterceptor

logger = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"

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
        self.requests = Counter("fsserve_requests", "Requests answered, by method (http:* for HTTP/REST) and status code", ["method", "code"], registry=self.registry)
        self.errors = Counter("fsserve_errors", "Requests answered with an error, by method (http:* for HTTP/REST) and status code", ["method", "code"], registry=self.registry)
        self.batch_size = Histogram("fsserve_batch_size", "Rows per executed batch", ["model"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue_seconds = Histogram("fsserve_queue_seconds", "Time a request waited in the batcher before its batch ran", ["model"], buckets=SECONDS_BUCKETS, registry=self.registry)
        self.inference_seconds = Histogram("fsserve_inference_seconds", "Time to run one batch through the model", ["model"], buckets=SECONDS_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("fsserve_queue_depth", "Requests waiting in the batcher", ["model"], registry=self.registry)
        self.in_flight = Gauge("fsserve_in_flight", "Requests in the batcher: queued or in the running batch", ["model"], registry=self.registry)
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


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """A pool holding every served service's file; ours lives in a private pool (see protos/generate.py)."""
    pool = descriptor_pool.DescriptorPool()
    for module in (health_pb2, reflection_pb2, pb):
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return pool


def _address(host: str, port: int) -> str:
    """host:port, bracketing IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class InferenceServer:
    """Serve models over the KServe v2 gRPC protocol, with metrics, health, reflection and graceful drain.

    >>> async def main():  # doctest: +SKIP
    ...     server = InferenceServer(ServerConfig(models={"sst2": "runs/sst2"}, port=0))
    ...     await server.start()
    ...     print(server.port)
    ...     await server.stop()
    """

    def __init__(self, config: ServerConfig, models: Mapping[str, ServedModel] | None = None) -> None:
        self.config = config
        self.metrics = ServerMetrics()
        self.models: dict[str, ServedModel] = dict(models) if models is not None else {}
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._server: aio.Server | None = None
        self._http: Any = None
        self._health: Any = None
        self._ready = False
        self._stopped: asyncio.Event | None = None

    @property
    def ready(self) -> bool:
        """Every model loaded and no shutdown begun."""
        return self._ready

    async def start(self) -> None:
        """Load the models (unless given), bind the ports and start answering."""
        self._stopped = asyncio.Event()
        if not self.models:
            for name, path in self.config.models.items():
                self.models[name] = ServedModel.load(name, path, self.config, metrics=self.metrics)
        for model in self.models.values():
            model.batcher.metrics = self.metrics
            await model.start()
        interceptors: list[aio.ServerInterceptor] = [StatusInterceptor(self.metrics)]
        if self.config.token:
            interceptors.append(TokenAuthInterceptor(self.config.token))
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0)]
        server = aio.server(interceptors=interceptors, options=options)
        servicer = InferenceServicer(self.models, self.config.max_text_bytes, lambda: self._ready)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server, pool=_reflection_pool())
        address = _address(self.config.host, self.config.port)
        if self.config.tls:
            assert self.config.tls_key is not None and self.config.tls_cert is not None
            key, cert = Path(self.config.tls_key).read_bytes(), Path(self.config.tls_cert).read_bytes()
            self.port = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
        else:
            self.port = server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"could not bind the gRPC port at {address}")
        await server.start()
        self._server = server
        if self.config.http_port is not None:
            try:
                await self._start_http(servicer)
            except BaseException:
                await server.stop(0)
                raise
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(self.config.host, self.config.metrics_port)
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._ready = True
        logger.info(
            "event=server_started host=%s port=%d http_port=%s tls=%s auth=%s models=%s max_batch_size=%d max_queue_delay_ms=%g max_queue_size=%d",
            self.config.host, self.port, self.http_port, self.config.tls, bool(self.config.token), ",".join(self.models),
            self.config.max_batch_size, self.config.max_queue_delay_ms, self.config.max_queue_size,
        )

    async def _start_http(self, servicer: InferenceServicer) -> None:
        """Answer the same models over KServe v2 HTTP/REST on ``http_port`` (TLS and token as for gRPC)."""
        try:
            from fsserve.serving.http_server import HttpFrontend
        except ImportError as exc:
            raise ImportError(f"HTTP serving needs aiohttp ({exc}): pip install 'fsserve[serve]'") from exc
        context = None
        if self.config.tls:
            import ssl

            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(self.config.tls_cert), str(self.config.tls_key))
        self._http = HttpFrontend(servicer, self.metrics, token=self.config.token)
        assert self.config.http_port is not None
        self.http_port = await self._http.start(self.config.host, self.config.http_port, context, shutdown_timeout=self.config.grace_period_s)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let accepted ones finish (up to ``grace`` seconds), then release everything."""
        if self._server is None:
            return
        grace = self.config.grace_period_s if grace is None else grace
        self._ready = False
        logger.info("event=draining grace_s=%g queued=%d", grace, sum(m.batcher.queued for m in self.models.values()))
        await self._health.enter_graceful_shutdown()
        for model in self.models.values():
            model.batcher.begin_drain()
        await asyncio.gather(self._server.stop(grace), self._http.stop() if self._http is not None else asyncio.sleep(0))
        self._http = None
        for model in self.models.values():
            await model.stop()
        self.metrics.close()
        self._server = None
        logger.info("event=server_stopped")
        if self._stopped is not None:
            self._stopped.set()

    async def wait_stopped(self) -> None:
        """Return once stop() has finished."""
        assert self._stopped is not None, "start() first"
        await self._stopped.wait()


def serve(config: ServerConfig, on_started: Any = None) -> None:
    """Run a server until SIGTERM or SIGINT, then drain and return (the `fsserve serve` entry point)."""

    async def main() -> None:
        server = InferenceServer(config)
        await server.start()
        if on_started is not None:
            on_started(server)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        logger.info("event=signal_received")
        await server.stop()

    asyncio.run(main())


class BackgroundServer:
    """An InferenceServer on its own event loop in a daemon thread: for tests, notebooks and benchmarks.

    >>> with BackgroundServer(ServerConfig(models={"sst2": "runs/sst2"}, port=0)) as server:  # doctest: +SKIP
    ...     url = f"127.0.0.1:{server.port}"
    """

    def __init__(self, config: ServerConfig, models: Mapping[str, ServedModel] | None = None, start_timeout: float = 60.0) -> None:
        self.server = InferenceServer(config, models)
        self.start_timeout = start_timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fsserve-server", daemon=True)

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        assert self.server.port is not None, "server not started"
        return self.server.port

    @property
    def http_port(self) -> int | None:
        """The bound HTTP/REST port, if HTTP is served."""
        return self.server.http_port

    @property
    def metrics_port(self) -> int | None:
        """The bound metrics port, if metrics are served."""
        return self.server.metrics_port

    def start(self) -> BackgroundServer:
        """Start the loop thread and the server; raise what start() raised."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(self.start_timeout)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Drain and stop the server, then the loop thread."""
        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop).result(self.start_timeout)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=10)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=1.0)
