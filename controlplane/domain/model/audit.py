"""The audit log's records: an entry, the chain head, a query."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Filters of a listing or an export; empty fields match everything."""

    project: str = ""
    actor: str = ""
    action: str = ""
    resource: str = ""
    # ISO-8601 UTC in the stored form: at or after `start`, before `end`.
    start: str = ""
    end: str = ""


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    # ISO-8601 UTC, as stored: when the entry was chained (`chain_time`); "" until then.
    at: str
    actor: str
    action: str
    resource: str
    project: str
    before: Mapping[str, Any] | None
    after: Mapping[str, Any] | None
    request_id: str
    mac: str = ""


@dataclass(frozen=True, slots=True)
class AuditHead:
    seq: int
    mac: str
    # head_seal(key, seq, mac); "" while not sealed (see `extend` and `reseal`).
    seal: str = ""
