"""Turn database failures into domain errors at the store's edge.

The blob store is called inside transactions too (the collector deletes and the
pipeline checks an archive under the digest's lock), and its failures are OSErrors
like the database driver's own: one raised by blob-store code (`controlplane.blobs`)
is reported as the blob store's (BlobStoreUnavailable), so a full disk or an
unreachable bucket does not pass for the database being down.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import exc

from controlplane.domain.errors import Aborted, BlobStoreUnavailable, Unavailable

log = logging.getLogger(__name__)

# PostgreSQL's serialization_failure and deadlock_detected: it rolled this transaction
# back so another could proceed; running it again is the documented remedy.
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})


def _sqlstate(error: exc.DBAPIError) -> str | None:
    return getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None)


@asynccontextmanager
async def translated() -> AsyncIterator[None]:
    try:
        yield
    except exc.DBAPIError as e:
        if _sqlstate(e) in _RETRYABLE_SQLSTATES:
            raise Aborted("concurrent update, retry") from e
        if isinstance(e, exc.IntegrityError):
            raise Aborted("a concurrent change conflicted with this one; retry") from e
        if isinstance(e, (exc.OperationalError, exc.InterfaceError)):
            raise Unavailable("the database is unavailable; retry") from e
        if e.connection_invalidated:
            raise Unavailable("the database connection was lost; retry") from e
        raise
    except (OSError, ConnectionError) as e:
        if _raised_by_blob_store(e):
            log.warning("the blob store failed inside a transaction", exc_info=e)
            raise BlobStoreUnavailable.of(e) from e
        raise Unavailable("the database is unavailable; retry") from e


def _raised_by_blob_store(error: BaseException) -> bool:
    """Whether blob-store code is on the path `error` was raised along (its traceback
    keeps the frames it passed through, worker threads' included)."""
    tb = error.__traceback__
    while tb is not None:
        if str(tb.tb_frame.f_globals.get("__name__", "")).startswith("controlplane.blobs."):
            return True
        tb = tb.tb_next
    return False
