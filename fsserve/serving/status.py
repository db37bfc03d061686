"""Failures and their gRPC status codes (and HTTP statuses): the domain errors, and the interceptors that answer with them.

The servicer, the codec and the batcher raise the errors below and never touch status codes; the
StatusInterceptor is the one place that turns them, and any unexpected exception, into what the
client sees. TokenAuthInterceptor refuses calls without the bearer token.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

logger = logging.getLogger(__name__)


class ServingError(Exception):
    """A failure that maps to one gRPC status code; the message names the problem for the client.

    Each subclass names its code once, in its class line (``class X(ServingError, code=...)``).

    >>> ServingError("no such thing").code.name
    'INTERNAL'
    >>> [(e.__name__, e.code.name) for e in ServingError.__subclasses__()][:2]
    [('InvalidInput', 'INVALID_ARGUMENT'), ('ModelNotFound', 'NOT_FOUND')]
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __init_subclass__(cls, code: grpc.StatusCode | None = None, **kwargs: Any) -> None:
        """Give each kind of failure its status code where the class is declared."""
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code


class InvalidInput(ServingError, code=grpc.StatusCode.INVALID_ARGUMENT):
    """The request is malformed: a missing, wrong-typed or oversized input."""


class ModelNotFound(ServingError, code=grpc.StatusCode.NOT_FOUND):
    """The request names a model (or version) this server does not serve."""


class QueueFull(ServingError, code=grpc.StatusCode.RESOURCE_EXHAUSTED):
    """The model's request queue is at its bound; the client should back off and retry."""


class DeadlineExceeded(ServingError, code=grpc.StatusCode.DEADLINE_EXCEEDED):
    """The request's deadline passed before its batch ran, so it was dropped from the batch."""


class Unavailable(ServingError, code=grpc.StatusCode.UNAVAILABLE):
    """The server is shutting down and takes no new work."""


class Unauthenticated(ServingError, code=grpc.StatusCode.UNAUTHENTICATED):
    """The request lacks the bearer token this server was started with."""


class RequestTooLarge(ServingError, code=grpc.StatusCode.RESOURCE_EXHAUSTED):
    """The request body is over the size limit (gRPC refuses such messages before any handler runs)."""


# The HTTP status of each kind of failure, for the REST front end; the first class in an error's
# MRO that is listed decides, so a new subclass inherits its parent's status until listed here.
HTTP_STATUS: dict[type[ServingError], int] = {
    InvalidInput: 400, Unauthenticated: 401, ModelNotFound: 404, RequestTooLarge: 413,
    QueueFull: 429, Unavailable: 503, DeadlineExceeded: 504, ServingError: 500,
}


def http_status(error: ServingError) -> int:
    """The HTTP status that answers ``error`` (HTTP_STATUS, walked along the error's class hierarchy).

    >>> http_status(QueueFull("full")), http_status(InvalidInput("bad"))
    (429, 400)
    """
    return next(HTTP_STATUS[cls] for cls in type(error).__mro__ if cls in HTTP_STATUS)


HEALTH_PREFIX = "/grpc.health.v1.Health/"


class _Undecodable:
    """Stands in for a request whose bytes are not the method's protobuf message."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """Wrap a request deserializer so undecodable bytes reach the handler (→ INVALID_ARGUMENT), not gRPC's UNKNOWN."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, or anything a parser raises
            return _Undecodable(exc)

    return deserialize


def _short(method: str) -> str:
    """``/inference.GRPCInferenceService/ModelInfer`` → ``ModelInfer`` for metric labels."""
    return method.rsplit("/", 1)[-1]


class StatusInterceptor(aio.ServerInterceptor):
    """Turn exceptions of unary-unary handlers into status codes, and count and log every answer.

    >>> interceptor = StatusInterceptor(metrics=None)
    >>> isinstance(interceptor, aio.ServerInterceptor)
    True
    """

    def __init__(self, metrics: Any = None) -> None:
        self.metrics = metrics

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        """Wrap the unary-unary behaviour of the method's handler; leave streaming ones alone."""
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.response_streaming:
            return handler
        method = _short(handler_call_details.method)
        inner = handler.unary_unary

        async def behavior(request: Any, context: aio.ServicerContext) -> Any:
            start = time.perf_counter()
            try:
                if isinstance(request, _Undecodable):
                    raise InvalidInput(f"request is not a valid protobuf message for {method}: {request.error}")
                response = await inner(request, context)
            except ServingError as exc:
                self._record(method, exc.code, start, exc.message)
                await context.abort(exc.code, exc.message)
            except aio.AbortError:
                raise
            except asyncio.CancelledError:
                self._record(method, grpc.StatusCode.CANCELLED, start, "cancelled by the client or past its deadline")
                raise
            except Exception as exc:  # noqa: BLE001 - the server must stay up and say INTERNAL
                logger.exception("event=unhandled_error method=%s", method)
                self._record(method, grpc.StatusCode.INTERNAL, start, repr(exc))
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
            else:
                self._record(method, grpc.StatusCode.OK, start, "")
                return response

        return grpc.unary_unary_rpc_method_handler(
            behavior, request_deserializer=_tolerant(handler.request_deserializer), response_serializer=handler.response_serializer
        )

    def _record(self, method: str, code: grpc.StatusCode, start: float, message: str) -> None:
        """Count the answer and log it as one key=value line."""
        if self.metrics is not None:
            self.metrics.record_request(method, code.name)
        ms = (time.perf_counter() - start) * 1000
        if code is grpc.StatusCode.OK:
            logger.debug("event=rpc method=%s code=OK ms=%.2f", method, ms)
        else:
            logger.info("event=rpc method=%s code=%s ms=%.2f message=%r", method, code.name, ms, message)


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``handler`` that answers UNAUTHENTICATED."""
    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if not handler.request_streaming and not handler.response_streaming:

        async def unary(request: Any, context: aio.ServicerContext) -> Any:
            raise Unauthenticated(message)  # StatusInterceptor (outside) counts and answers it

        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)

    async def refuse(request: Any, context: aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request: Any, context: aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # an async generator, as streaming responses are  # pragma: no cover

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    return grpc.unary_stream_rpc_method_handler(refuse_stream, **kwargs)


class TokenAuthInterceptor(aio.ServerInterceptor):
    """Refuse every call without ``authorization: Bearer <token>`` (health checks excepted, for probes).

    >>> TokenAuthInterceptor("s3cret").expected
    b'Bearer s3cret'
    """

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("token must be a non-empty string")
        self.expected = f"Bearer {token}".encode()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        """Pass authorised calls and health checks through; answer the rest UNAUTHENTICATED."""
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        given = next((v for k, v in handler_call_details.invocation_metadata or () if k == "authorization"), None)
        if given is None:
            return _refusal(handler, "missing 'authorization: Bearer <token>' metadata")
        given_bytes = given if isinstance(given, bytes) else str(given).encode()
        if not hmac.compare_digest(given_bytes, self.expected):
            return _refusal(handler, "invalid bearer token")
        return handler
