"""The one exception hierarchy of pdserve.

The engine, the daemons and the client SDK raise these classes. The gRPC edge maps
each class to one status code (and the SDK maps the status back to the same class),
so a caller catches `InvalidRequestError` whether it talks to an engine in-process
or to a router over the network.
"""

from __future__ import annotations


class PdserveError(Exception):
    """Base class. `code` names the gRPC status the edge maps this error to."""

    code = "INTERNAL"

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        if request_id is not None:
            message = f"request {request_id}: {message}"
        super().__init__(message)
        self.request_id = request_id


class InvalidRequestError(PdserveError):
    """A request field is invalid; `field` names it."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str, *, request_id: str | None = None) -> None:
        super().__init__(f"{field}: {message}", request_id=request_id)
        self.field = field


class CapacityError(PdserveError):
    """Not enough room (KV blocks, queue slots, message size) to take the request now.

    `retry_after_s`, when set, is when trying again makes sense (admission control)."""

    code = "RESOURCE_EXHAUSTED"
    retry_after_s: float | None = None


class IncompatibleError(PdserveError):
    """Two workers cannot be paired: model fingerprint or KV layout differ."""

    code = "FAILED_PRECONDITION"


class KVTransferError(PdserveError):
    """A KV transfer failed (peer died, stalled, or sent chunks that do not check out)."""

    code = "UNAVAILABLE"


class UnavailableError(PdserveError):
    """No worker can serve the request now."""

    code = "UNAVAILABLE"


class DeadlineError(PdserveError):
    """The request's deadline passed."""

    code = "DEADLINE_EXCEEDED"


class CancelledError(PdserveError):
    """The request was cancelled by its caller."""

    code = "CANCELLED"


class NotFoundError(PdserveError):
    """A request id, model or file that does not exist."""

    code = "NOT_FOUND"


class AuthenticationError(PdserveError):
    """No valid API key."""

    code = "UNAUTHENTICATED"


class FatalError(PdserveError):
    """A bug or a broken worker; the request cannot be completed."""

    code = "INTERNAL"
