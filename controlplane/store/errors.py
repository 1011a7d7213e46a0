"""Turn database failures into domain errors at the store's edge."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import exc

from controlplane.domain.errors import Aborted, Unavailable


@asynccontextmanager
async def translated() -> AsyncIterator[None]:
    try:
        yield
    except exc.IntegrityError as e:
        raise Aborted("a concurrent change conflicted with this one; retry") from e
    except (exc.OperationalError, exc.InterfaceError, OSError, ConnectionError) as e:
        raise Unavailable("the database is unavailable; retry") from e
    except exc.DBAPIError as e:
        if e.connection_invalidated:
            raise Unavailable("the database connection was lost; retry") from e
        raise
