"""pdserve.status: every exception maps to its status code and back to the same
class with the same message, request id and field."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdserve.errors import (
    CancelledError,
    CapacityError,
    DeadlineError,
    FatalError,
    IncompatibleError,
    InvalidRequestError,
    KVTransferError,
    NotFoundError,
    PdserveError,
    UnavailableError,
)
from pdserve.status import abort_with, error_from_status, status_code, status_details

# (exception, its status, the class the status maps back to)
CASES: list[tuple[PdserveError, grpc.StatusCode, type[PdserveError]]] = [
    (InvalidRequestError("temperature", "must be >= 0, got -1"), grpc.StatusCode.INVALID_ARGUMENT,
     InvalidRequestError),
    (CapacityError("no KV blocks"), grpc.StatusCode.RESOURCE_EXHAUSTED, CapacityError),
    (IncompatibleError("weights digest differs"), grpc.StatusCode.FAILED_PRECONDITION, IncompatibleError),
    (KVTransferError("prefill peer died"), grpc.StatusCode.UNAVAILABLE, UnavailableError),
    (UnavailableError("no healthy decode worker"), grpc.StatusCode.UNAVAILABLE, UnavailableError),
    (DeadlineError("deadline passed"), grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineError),
    (CancelledError("client went away"), grpc.StatusCode.CANCELLED, CancelledError),
    (NotFoundError("no such model"), grpc.StatusCode.NOT_FOUND, NotFoundError),
    (FatalError("engine thread died"), grpc.StatusCode.INTERNAL, FatalError),
]


@pytest.mark.parametrize(("exc", "code", "back"), CASES, ids=lambda v: type(v).__name__)
def test_status_code_of_each_class(exc: PdserveError, code: grpc.StatusCode, back: type) -> None:
    assert status_code(exc) is code
    assert status_code(exc).name == exc.code


@pytest.mark.parametrize(("exc", "code", "back"), CASES, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("request_id", [None, "req-7", "a:b"])
def test_round_trip_keeps_class_message_and_request_id(
    exc: PdserveError, code: grpc.StatusCode, back: type[PdserveError], request_id: str | None
) -> None:
    if request_id is not None:
        exc = _with_request_id(exc, request_id)
    error = error_from_status(status_code(exc), str(exc))
    assert type(error) is back
    assert str(error) == str(exc)
    assert error.request_id == request_id
    # The prefix is written once, not once per trip.
    again = error_from_status(status_code(error), str(error))
    assert str(again) == str(exc)


@pytest.mark.parametrize("request_id", [None, "r1"])
@pytest.mark.parametrize("field", ["temperature", "messages[0].role", "prompt"])
def test_invalid_argument_recovers_the_field(field: str, request_id: str | None) -> None:
    exc = InvalidRequestError(field, "is wrong: really", request_id=request_id)
    error = error_from_status(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    assert isinstance(error, InvalidRequestError)
    assert (error.field, error.request_id, str(error)) == (field, request_id, str(exc))


def test_invalid_argument_without_field_keeps_its_text() -> None:
    error = error_from_status(grpc.StatusCode.INVALID_ARGUMENT, "bad")
    assert isinstance(error, InvalidRequestError)
    assert str(error) == "bad"
    assert error.field == ""


def test_other_exceptions_are_internal() -> None:
    assert status_code(ValueError("x")) is grpc.StatusCode.INTERNAL
    assert status_code(KeyError("k")) is grpc.StatusCode.INTERNAL
    assert status_details(KeyError("k")) == "internal error: KeyError: 'k'"
    assert isinstance(error_from_status(grpc.StatusCode.INTERNAL, "boom"), FatalError)


@pytest.mark.parametrize("code", [grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNKNOWN,
                                  grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.DATA_LOSS])
def test_foreign_statuses_are_fatal_and_name_their_code(code: grpc.StatusCode) -> None:
    error = error_from_status(code, "Method not found!")
    assert type(error) is FatalError
    assert str(error) == f"{code.name}: Method not found!"


def test_empty_details() -> None:
    error = error_from_status(grpc.StatusCode.UNAVAILABLE, "")
    assert type(error) is UnavailableError and str(error) == ""


class _FakeContext:
    """Records the abort and raises, as grpc.aio.ServicerContext.abort does."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata=()) -> None:
        self.aborted = (code, details)
        self.trailers = tuple(trailing_metadata)
        raise asyncio.CancelledError  # grpc.aio raises a private AbortError; any raise will do


def test_abort_with_sends_the_mapped_status() -> None:
    context = _FakeContext()
    exc = CapacityError("no blocks", request_id="r9")
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(abort_with(context, exc))  # type: ignore[arg-type]
    assert context.aborted == (grpc.StatusCode.RESOURCE_EXHAUSTED, "request r9: no blocks")
    assert context.trailers == ()


def test_a_retry_hint_travels_in_the_pushback_trailer() -> None:
    context = _FakeContext()
    exc = CapacityError("queue full")
    exc.retry_after_s = 1.5
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(abort_with(context, exc))  # type: ignore[arg-type]
    assert context.trailers == (("grpc-retry-pushback-ms", "1500"),)


def _with_request_id(exc: PdserveError, request_id: str) -> PdserveError:
    if isinstance(exc, InvalidRequestError):
        field, message = str(exc).split(": ", 1)
        return InvalidRequestError(field, message, request_id=request_id)
    return type(exc)(str(exc), request_id=request_id)
