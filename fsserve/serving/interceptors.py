"""Server interceptors: exceptions → gRPC status codes (with metrics and logs), and bearer-token auth.

The servicer raises domain errors (fsserve.serving.errors) and never touches status codes; this is
the one place that turns them, and any unexpected exception, into what the client sees.
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

from fsserve.serving.errors import ServingError, Unauthenticated

logger = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"


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
            behavior, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
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
