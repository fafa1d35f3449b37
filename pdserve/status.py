"""The one mapping between pdserve exceptions and gRPC status codes.

Servers turn an exception into a status with `status_code` (or `abort_with`);
the client SDK turns a status back into the same exception class with
`error_from_status`. The status details are `str(exc)`, so the message,
including its "request <id>: " prefix and an InvalidRequestError's
"<field>: " prefix, survives the trip and the field can be recovered.

Imports grpc but never torch: the client SDK depends on this module.
"""

from __future__ import annotations

import re
from typing import NoReturn

import grpc

from pdserve.errors import (
    AuthenticationError,
    CancelledError,
    CapacityError,
    DeadlineError,
    FatalError,
    IncompatibleError,
    InvalidRequestError,
    NotFoundError,
    PdserveError,
    UnavailableError,
)

# The reverse map. UNAVAILABLE has two forward sources (KVTransferError and
# UnavailableError); a client cannot tell them apart, so it gets the general one.
_ERROR_CLASSES: dict[grpc.StatusCode, type[PdserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: CapacityError,
    grpc.StatusCode.FAILED_PRECONDITION: IncompatibleError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INTERNAL: FatalError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
}

# PdserveError writes "request <id>: <message>"; ids contain no whitespace.
_REQUEST_PREFIX = re.compile(r"request (\S+?): (.*)", re.DOTALL)
# InvalidRequestError writes "<field>: <message>"; field paths like
# "messages[0].role" contain no whitespace.
_FIELD_PREFIX = re.compile(r"(\S+?): (.*)", re.DOTALL)


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status a server answers with when `exc` ends a request."""
    if isinstance(exc, PdserveError):
        code = getattr(grpc.StatusCode, exc.code, None)
        if isinstance(code, grpc.StatusCode):
            return code
    return grpc.StatusCode.INTERNAL


def status_details(exc: BaseException) -> str:
    """The status details for `exc`: its message, which `error_from_status` parses back."""
    if isinstance(exc, PdserveError):
        return str(exc)
    # A bug: name the exception type, since str() of e.g. KeyError alone says little.
    return f"internal error: {type(exc).__name__}: {exc}"


def error_from_status(code: grpc.StatusCode, details: str) -> PdserveError:
    """The pdserve exception a status stands for, with the server's message intact."""
    details = details or ""
    request_id, message = _split_request_id(details)
    cls = _ERROR_CLASSES.get(code)
    if cls is None:
        # Not a status pdserve sends (UNIMPLEMENTED, UNKNOWN, ...): keep the code's
        # name in the message, it is the most useful part.
        return FatalError(f"{code.name}: {details}")
    if cls is InvalidRequestError:
        return _invalid_request(message, request_id, details)
    return cls(message, request_id=request_id)


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """Ends the RPC with the status that `exc` maps to; never returns.

    A retry hint (CapacityError.retry_after_s) goes in the `grpc-retry-pushback-ms` trailer, which
    gRPC's own retry policy honours."""
    retry_after = getattr(exc, "retry_after_s", None)
    trailers = (("grpc-retry-pushback-ms", str(int(retry_after * 1e3))),) if retry_after is not None else ()
    await context.abort(status_code(exc), status_details(exc), trailers)
    # context.abort raises; this line only satisfies NoReturn.
    raise AssertionError("grpc.aio.ServicerContext.abort returned")


def _split_request_id(details: str) -> tuple[str | None, str]:
    match = _REQUEST_PREFIX.fullmatch(details)
    if match is None:
        return None, details
    return match.group(1), match.group(2)


def _invalid_request(message: str, request_id: str | None, details: str) -> InvalidRequestError:
    match = _FIELD_PREFIX.fullmatch(message)
    if match is not None:
        return InvalidRequestError(match.group(1), match.group(2), request_id=request_id)
    # A server outside pdserve (or grpc itself) wrote no field; keep its text as is.
    error = InvalidRequestError("", message, request_id=request_id)
    error.args = (details,)
    return error
