"""Domain errors of the serving path, each carrying the gRPC status code a client should see."""

from __future__ import annotations

import grpc


class ServingError(Exception):
    """A failure that maps to one gRPC status code; the message names the problem for the client.

    >>> ServingError("no such thing").code
    <StatusCode.INTERNAL: (13, 'internal')>
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServingError):
    """The request is malformed: a missing, wrong-typed or oversized input.

    >>> InvalidInput("input 'TEXT' is missing").code.name
    'INVALID_ARGUMENT'
    """

    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(ServingError):
    """The request names a model (or version) this server does not serve.

    >>> ModelNotFound("unknown model 'x'").code.name
    'NOT_FOUND'
    """

    code = grpc.StatusCode.NOT_FOUND


class QueueFull(ServingError):
    """The model's request queue is at its bound; the client should back off and retry.

    >>> QueueFull("queue full").code.name
    'RESOURCE_EXHAUSTED'
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServingError):
    """The request's deadline passed before its batch ran, so it was dropped from the batch.

    >>> DeadlineExceeded("too late").code.name
    'DEADLINE_EXCEEDED'
    """

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(ServingError):
    """The server is shutting down and takes no new work.

    >>> Unavailable("draining").code.name
    'UNAVAILABLE'
    """

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ServingError):
    """The request lacks the bearer token this server was started with.

    >>> Unauthenticated("missing token").code.name
    'UNAUTHENTICATED'
    """

    code = grpc.StatusCode.UNAUTHENTICATED
