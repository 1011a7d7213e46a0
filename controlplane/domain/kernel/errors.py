"""One exception tree for the whole domain.

Each class names the gRPC status it maps to (as a string: the domain does not import
grpc). `rpc/errors.py` is the one place that turns these into a status and message.
"""

from __future__ import annotations

import errno
import os


class DomainError(Exception):
    """Base of every error the control plane reports to a caller."""

    code = "INTERNAL"

    def __init__(self, message: str, *, field: str | None = None, retry_after_ms: int | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after_ms = retry_after_ms

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidArgument(DomainError):
    """The request is malformed; `field` names the part at fault."""

    code = "INVALID_ARGUMENT"


class NotFound(DomainError):
    code = "NOT_FOUND"


class AlreadyExists(DomainError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    """The request is well-formed but the system is not in a state that allows it."""

    code = "FAILED_PRECONDITION"


class OutOfRange(DomainError):
    """A revision or cursor outside what the server has issued or retains."""

    code = "OUT_OF_RANGE"


class Unauthenticated(DomainError):
    code = "UNAUTHENTICATED"


class PermissionDenied(DomainError):
    code = "PERMISSION_DENIED"


class ResourceExhausted(DomainError):
    """A limit was hit; `retry_after_ms` tells the caller when to try again."""

    code = "RESOURCE_EXHAUSTED"


class DataLoss(DomainError):
    """Stored data is damaged: what the server holds is not what it recorded."""

    code = "DATA_LOSS"


class Unavailable(DomainError):
    """A dependency (the database) is not reachable; retry."""

    code = "UNAVAILABLE"


class BlobStoreUnavailable(Unavailable):
    """The blob store failed (disk full, permission denied, endpoint unreachable): said
    apart from the database so an operator looks at the right dependency."""

    @classmethod
    def of(cls, error: BaseException, reason: str = "") -> BlobStoreUnavailable:
        """Naming the failure by `reason` (a backend's error code), an OSError's errno
        (not its text, which may carry a path or an endpoint), or else its type."""
        if not reason:
            number = error.errno if isinstance(error, OSError) else None
            if number and number in errno.errorcode:
                reason = f"{errno.errorcode[number]}: {os.strerror(number)}"
            else:
                reason = type(error).__name__
        return cls(f"the blob store failed ({reason}); retry")


class DeadlineExceeded(DomainError):
    """The server stopped waiting for the caller (an upload that stalled or trickled);
    the message says how long it waited and for what."""

    code = "DEADLINE_EXCEEDED"


class Aborted(DomainError):
    """A concurrent change conflicted with this one; retrying is safe."""

    code = "ABORTED"
