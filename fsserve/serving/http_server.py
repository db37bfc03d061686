"""The KServe v2 HTTP/REST front end: the gRPC server's servicer, batchers and errors, answered over aiohttp.

It runs on the gRPC server's event loop and calls the same ``InferenceServicer`` (decode → batcher →
encode), so a request gets the same validation, the same batches and the same messages whichever
protocol carries it; ``rest.py`` converts JSON to and from the gRPC messages, and the one table
``status.HTTP_STATUS`` gives each failure its HTTP status (400 invalid input, 404 unknown model,
413 body over the limit, 429 queue full, 503 shutting down), with the v2 error body
``{"error": "..."}``. Endpoints::

    GET  /v2/health/live, /v2/health/ready             200, or 503 when not ready
    GET  /v2                                           server metadata
    GET  /v2/models/NAME[/versions/V]                  model metadata
    GET  /v2/models/NAME[/versions/V]/ready            200, or 503 when not ready (unknown: not ready)
    POST /v2/models/NAME[/versions/V]/infer            inference (JSON, or Triton's binary tensor data)

With a token, every call but the two health checks needs ``Authorization: Bearer TOKEN``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from fsserve.serving.config import MAX_MESSAGE_BYTES
from fsserve.serving.rest import BINARY_EXTENSION, HEADER_LENGTH, encode_infer_response, model_metadata_json, parse_infer_request
from fsserve.serving.servicer import InferenceServicer
from fsserve.serving.status import RequestTooLarge, ServingError, Unauthenticated, http_status

logger = logging.getLogger(__name__)

HEALTH_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, message: str) -> web.Response:
    """The v2 protocol's error answer: ``{"error": message}`` under an HTTP status."""
    return web.json_response({"error": message}, status=status)


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket for host:port (0 picks a free port), IPv4 or IPv6 as the host says."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    try:
        return socket.create_server((host, port), family=family, backlog=512)
    except OSError as exc:
        raise OSError(f"could not bind the HTTP port at {host}:{port}: {exc}") from exc


class HttpFrontend:
    """Serve a servicer's models over the KServe v2 REST protocol, on the running event loop.

    >>> frontend = HttpFrontend(InferenceServicer({}, max_text_bytes=8192, is_ready=lambda: True))
    >>> sorted(r.name for r in frontend.app.router.routes() if r.name)[:2]
    ['ModelInfer', 'ModelInferVersion']
    """

    def __init__(self, servicer: InferenceServicer, metrics: Any = None, token: str | None = None, max_body_bytes: int = MAX_MESSAGE_BYTES) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be at least 1, got {max_body_bytes}")
        self.servicer = servicer
        self.metrics = metrics
        self.expected = f"Bearer {token}".encode() if token else None
        self.max_body_bytes = max_body_bytes
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[self._answer], client_max_size=max_body_bytes)
        routes = [
            ("GET", "/v2/health/live", self.server_live, "ServerLive"),
            ("GET", "/v2/health/ready", self.server_ready, "ServerReady"),
            ("GET", "/v2", self.server_metadata, "ServerMetadata"),
        ]
        for suffix, version in (("", ""), ("/versions/{version}", "Version")):
            base = "/v2/models/{model}" + suffix
            routes += [
                ("GET", base, self.model_metadata, f"ModelMetadata{version}"),
                ("GET", base + "/ready", self.model_ready, f"ModelReady{version}"),
                ("POST", base + "/infer", self.model_infer, f"ModelInfer{version}"),
            ]
        for method, path, handler, name in routes:
            self.app.router.add_route(method, path, handler, name=name)

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None, shutdown_timeout: float = 30.0) -> int:
        """Bind host:port and start answering; return the bound port."""
        sock = listening_socket(host, port)
        self._runner = web.AppRunner(self.app, handle_signals=False, access_log=None, shutdown_timeout=shutdown_timeout)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=ssl_context).start()
        self.port = int(sock.getsockname()[1])
        logger.info("event=http_listening host=%s port=%d tls=%s", host, self.port, ssl_context is not None)
        return self.port

    async def stop(self) -> None:
        """Stop listening, let accepted requests finish (up to the shutdown timeout), close the connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- the one place failures become answers ------------------------------------------------
    @web.middleware
    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Check the token, run the handler, and turn failures into v2 error bodies; count and log every answer."""
        start = time.perf_counter()
        route = request.match_info.route.name or "unknown"
        method = f"http:{route.removesuffix('Version')}"
        try:
            self._authorise(request)
            response = await handler(request)
        except ServingError as exc:
            self._record(method, exc.code.name, start, exc.message)
            return error_response(http_status(exc), exc.message)
        except web.HTTPException as exc:  # no such path, or a method the path does not take
            message = f"{exc.reason}: {request.method} {request.path}"
            self._record(method, f"HTTP_{exc.status}", start, message)
            return error_response(exc.status, message)
        except asyncio.CancelledError:
            self._record(method, "CANCELLED", start, "the client went away")
            raise
        except Exception as exc:  # noqa: BLE001 - the server must stay up and say 500
            logger.exception("event=unhandled_error method=%s", method)
            self._record(method, "INTERNAL", start, repr(exc))
            return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
        self._record(method, "OK", start, "")
        return response

    def _authorise(self, request: web.Request) -> None:
        """Refuse a call without the bearer token (when the server has one); health checks pass, for probes."""
        if self.expected is None or request.path in HEALTH_PATHS:
            return
        given = request.headers.get("Authorization")
        if given is None:
            raise Unauthenticated("missing 'Authorization: Bearer <token>' header")
        if not hmac.compare_digest(given.encode(), self.expected):
            raise Unauthenticated("invalid bearer token")

    def _record(self, method: str, code: str, start: float, message: str) -> None:
        """Count the answer and log it as one key=value line, as the gRPC interceptor does."""
        if self.metrics is not None:
            self.metrics.record_request(method, code)
        ms = (time.perf_counter() - start) * 1000
        if code == "OK":
            logger.debug("event=http method=%s code=OK ms=%.2f", method, ms)
        else:
            logger.info("event=http method=%s code=%s ms=%.2f message=%r", method, code, ms, message)

    # -- endpoints ----------------------------------------------------------------------------
    async def server_live(self, request: web.Request) -> web.Response:
        """Live as long as the process answers."""
        return web.json_response({"live": True})

    async def server_ready(self, request: web.Request) -> web.Response:
        """200 once every model is loaded, until shutdown begins; 503 otherwise."""
        ready = bool(self.servicer.is_ready())
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        """Server name, version and extensions (this front end adds Triton's binary tensor data)."""
        metadata = self.servicer.server_metadata()
        return web.json_response({"name": metadata.name, "version": metadata.version, "extensions": [*metadata.extensions, BINARY_EXTENSION]})

    async def model_metadata(self, request: web.Request) -> web.Response:
        """The model's versions, platform, inputs and outputs; 404 for an unknown model or version."""
        info = request.match_info
        return web.json_response(model_metadata_json(self.servicer.model_metadata(info["model"], info.get("version", ""))))

    async def model_ready(self, request: web.Request) -> web.Response:
        """200 when the model is ready, 503 otherwise (an unknown model is simply not ready, as over gRPC)."""
        ready = self.servicer.model_ready(request.match_info["model"], request.match_info.get("version", ""))
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def model_infer(self, request: web.Request) -> web.Response:
        """Decode the JSON (or JSON + binary) request, classify through the model's batcher, encode the answer."""
        body = await self._read_body(request)
        parsed = parse_infer_request(body, request.headers.get(HEADER_LENGTH), request.match_info["model"], request.match_info.get("version", ""))
        response = await self.servicer.infer(parsed.request)
        payload, header_length = encode_infer_response(response, parsed)
        if header_length is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(body=payload, content_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole (decompressed) body, or RequestTooLarge when it is over the limit."""
        declared = request.content_length
        if declared is not None and declared > self.max_body_bytes:
            raise RequestTooLarge(f"request body is {declared} bytes; the limit is {self.max_body_bytes}")
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise RequestTooLarge(f"request body is over the limit of {self.max_body_bytes} bytes") from None
