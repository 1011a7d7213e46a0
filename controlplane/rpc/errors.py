"""The one table from domain errors to gRPC status codes.

Each domain error names its status (`controlplane/domain/kernel/errors.py`); the table is
`STATUS`, by name: INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION,
OUT_OF_RANGE, UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED, DATA_LOSS (stored
data is damaged: a bundle's archive that does not hash to its digest), UNAVAILABLE,
DEADLINE_EXCEEDED, ABORTED, INTERNAL.
"""

from __future__ import annotations

import logging
import random

import grpc

from controlplane.domain.kernel.errors import DomainError

log = logging.getLogger(__name__)

STATUS = {name: getattr(grpc.StatusCode, name) for name in grpc.StatusCode.__members__}

# Details travel in a trailing header; clients refuse headers past 16 KiB (grpcio's hard
# limit) and would see RESOURCE_EXHAUSTED instead of our answer. A message names its
# field first, so a prefix keeps what matters, and no bad value is ever echoed whole.
MAX_DETAILS = 1024


def bounded(message: str, limit: int = MAX_DETAILS) -> str:
    """`message`, cut to about `limit` characters, saying so when cut."""
    if len(message) <= limit:
        return message
    return f"{message[:limit]}… ({len(message)} characters, cut)"


def status_of(error: DomainError) -> grpc.StatusCode:
    return STATUS.get(error.code, grpc.StatusCode.INTERNAL)


def retry_metadata(error: DomainError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata telling a client when to retry (RESOURCE_EXHAUSTED, UNAVAILABLE)."""
    if error.retry_after_ms is None:
        return ()
    # Jitter the hint so clients told together do not come back together.
    hint = int(error.retry_after_ms * random.uniform(0.5, 1.5))
    return (("retry-after-ms", str(hint)), ("grpc-retry-pushback-ms", str(hint)))


def set_status(context: grpc.aio.ServicerContext, error: DomainError) -> None:
    """Give the call `error`'s status and retry hint without raising: a handler that
    then returns ends the call with it."""
    metadata = retry_metadata(error)
    if metadata:
        context.set_trailing_metadata(metadata)
    context.set_code(status_of(error))
    context.set_details(bounded(str(error)))


async def abort(context: grpc.aio.ServicerContext, error: BaseException, method: str) -> None:
    """Turn `error` into the call's status. Unknown errors become INTERNAL, logged, not leaked."""
    if isinstance(error, DomainError):
        set_status(context, error)
        await context.abort(status_of(error), bounded(str(error)))
    log.exception("unhandled error in %s", method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
