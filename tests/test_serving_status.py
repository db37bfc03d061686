"""Each serving failure answers with its own gRPC status code (the interceptor reads ``code`` off the error)."""

from __future__ import annotations

import grpc
import pytest

from fsserve.serving import status


@pytest.mark.parametrize(("error", "code"), [
    (status.ServingError, grpc.StatusCode.INTERNAL),
    (status.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (status.ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (status.QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (status.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (status.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (status.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
])
def test_each_error_has_its_code_and_keeps_its_message(error: type[status.ServingError], code: grpc.StatusCode) -> None:
    exc = error("input 'TEXT' is missing")
    assert exc.code is code and exc.message == "input 'TEXT' is missing" and str(exc) == exc.message
    assert isinstance(exc, status.ServingError)


def test_a_subclass_without_a_code_inherits_its_parents() -> None:
    class Oversize(status.InvalidInput):
        """A narrower kind of bad input."""

    assert Oversize("too big").code is grpc.StatusCode.INVALID_ARGUMENT
    assert status.ServingError.code is grpc.StatusCode.INTERNAL  # declaring subclasses never touched the base
