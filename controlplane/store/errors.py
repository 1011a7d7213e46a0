"""Turn database failures into domain errors at the store's edge.

The blob store is called inside transactions too (the collector deletes and the
pipeline checks an archive under the digest's lock); its failures leave it as
BlobStoreUnavailable already (`blobs.base.reported`), so an OSError reaching here is
the database driver's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import exc

from controlplane.domain.kernel.errors import Aborted, Unavailable

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
        raise Unavailable("the database is unavailable; retry") from e
