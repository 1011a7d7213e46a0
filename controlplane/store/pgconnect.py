"""Connecting to whichever of several PostgreSQL hosts is the primary.

A database URL may list several hosts, libpq style:

    postgresql+asyncpg://user@/controlplane?host=db-a:5432&host=db-b:5432&target_session_attrs=read-write

asyncpg can try several hosts itself, but under one timeout for all of them: a host
that drops packets (a dead machine) uses it up and the next host is never tried. Here
each host gets its own `connect_timeout` (libpq's meaning of the parameter), and the
host that last accepted comes first, so after a failover the dead one is tried last.
`target_session_attrs` is asyncpg's own check of each connection (`read-write` skips a
standby and a primary still being promoted).

The pool (store/engine.py) and the LISTEN connection (store/listen.py) both connect
through `PgConnector`, so both find the new primary on their own.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

# Per host: long enough for a loaded server across a data centre, short enough that a
# dead machine listed first costs a failover only seconds (and only once: see above).
DEFAULT_CONNECT_TIMEOUT = 3.0
# Options of the URL that configure SQLAlchemy's adapter, not asyncpg.
_ADAPTER_OPTIONS = ("prepared_statement_cache_size", "prepared_statement_name_func", "async_fallback")


# A standby refused by target_session_attrs is an InternalClientError.
_CLIENT_ERRORS = (asyncpg.exceptions.InterfaceError, asyncpg.exceptions.InternalClientError)


class NoUsableHost(ConnectionError):
    """No host of the URL accepted a connection of the kind asked for."""


class PgConnector:
    def __init__(self, url: str):
        # SQLAlchemy's own reading of the URL, so the pool's dialect and this agree.
        dialect = PGDialect_asyncpg()  # type: ignore[no-untyped-call]
        options: dict[str, Any] = dict(dialect.create_connect_args(make_url(url))[1])  # type: ignore[no-untyped-call]
        for name in _ADAPTER_OPTIONS:
            options.pop(name, None)
        self.connect_timeout = float(options.pop("connect_timeout", DEFAULT_CONNECT_TIMEOUT))
        hosts, ports = options.pop("host", None), options.pop("port", None)
        if isinstance(hosts, list):
            self.hosts: list[tuple[str | None, int | None]] = [
                (h, int(p) if p is not None else None) for h, p in zip(hosts, ports or [], strict=True)
            ]
        else:
            self.hosts = [(hosts, int(ports) if ports is not None else None)]
        self._options = options
        # The index of the host that accepted last: tried first next time.
        self._last = 0

    @property
    def last_host(self) -> str:
        """host:port of the host that accepted last (or would be tried first)."""
        host, port = self.hosts[self._last]
        return f"{host or 'localhost'}:{port or 5432}"

    async def connect(self) -> asyncpg.Connection:
        """A connection to the first host (the last good one first) that accepts one of
        the kind the URL asks for; NoUsableHost, naming each host's answer, otherwise."""
        order = [self._last, *(i for i in range(len(self.hosts)) if i != self._last)]
        failures = []
        for index in order:
            host, port = self.hosts[index]
            try:
                conn = await asyncpg.connect(
                    host=host, port=port, timeout=self.connect_timeout, **self._options
                )
            except (OSError, TimeoutError, asyncpg.PostgresError, *_CLIENT_ERRORS) as e:
                failures.append(f"{host or 'localhost'}:{port or 5432}: {type(e).__name__}: {e}")
                continue
            if index != self._last:
                log.info("database: connected to %s:%s", host, port)
            self._last = index
            return conn
        raise NoUsableHost("no database host accepted a connection: " + "; ".join(failures))
