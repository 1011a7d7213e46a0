"""Who did what: the audit trail every mutation writes in its own transaction.

The domain records entries through `Tx.audit`; the store appends them to the
tamper-evident chain. Who is acting comes from the request context (set by the
transport for operators and nodes, by background jobs for the system itself), so the
domain never passes identities around by hand.
"""

from __future__ import annotations

import contextvars
import enum
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from controlplane.domain.ports import Store


class ActorKind(enum.StrEnum):
    OPERATOR = "operator"
    NODE = "node"
    SYSTEM = "system"
    ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Actor:
    kind: ActorKind
    id: str
    project: str = ""

    def __str__(self) -> str:
        return f"{self.kind.value}:{self.id}"


ANONYMOUS = Actor(ActorKind.ANONYMOUS, "anonymous")
_actor: contextvars.ContextVar[Actor] = contextvars.ContextVar("actor", default=ANONYMOUS)
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def current_actor() -> Actor:
    return _actor.get()


def current_request_id() -> str:
    return _request_id.get()


def set_context(actor: Actor, request_id: str) -> None:
    _actor.set(actor)
    _request_id.set(request_id)


@contextmanager
def acting_as(actor: Actor, request_id: str = "") -> Iterator[None]:
    """Run a block as `actor` (background jobs act as the system)."""
    actor_token = _actor.set(actor)
    request_token = _request_id.set(request_id)
    try:
        yield
    finally:
        _actor.reset(actor_token)
        _request_id.reset(request_token)


def system(job: str) -> Actor:
    return Actor(ActorKind.SYSTEM, job)


class AuditLog(Protocol):
    async def head(self) -> tuple[int, str]:
        """The chain head: last sequence number and MAC."""
        ...

    def entries(self, batch: int = 1000) -> AsyncIterator[AuditEntry]: ...

    async def query(
        self, where: AuditQuery, limit: int, after_seq: int, newest_first: bool
    ) -> list[AuditEntry]:
        """Entries matching `where`, in sequence order, after (or, newest first, before)
        `after_seq` (0: from the start)."""
        ...

    async def record(
        self,
        action: str,
        resource: str,
        *,
        project: str = "",
        before: Mapping[str, Any] | None = None,
        after: Mapping[str, Any] | None = None,
    ) -> None:
        """Append an entry for the current actor and request, in the caller's transaction."""
        ...


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


# -- the chain ------------------------------------------------------------------------
#
# Each entry's MAC is HMAC-SHA256(key, canonical(entry) || previous MAC). Editing an
# entry breaks its MAC; deleting, inserting or reordering entries breaks the next one's;
# cutting the tail breaks the match with the chain head kept beside the log.

GENESIS = "0" * 64


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    at: str  # ISO-8601 UTC, as stored
    actor: str
    action: str
    resource: str
    project: str
    before: Mapping[str, Any] | None
    after: Mapping[str, Any] | None
    request_id: str
    mac: str = ""


def canonical(entry: AuditEntry) -> bytes:
    """The bytes a MAC covers: every field but the MAC, in a fixed JSON form."""
    body = {
        "seq": entry.seq,
        "at": entry.at,
        "actor": entry.actor,
        "action": entry.action,
        "resource": entry.resource,
        "project": entry.project,
        "before": entry.before,
        "after": entry.after,
        "request_id": entry.request_id,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str).encode()


def chain_mac(key: bytes, entry: AuditEntry, previous_mac: str) -> str:
    return hmac.new(key, canonical(entry) + previous_mac.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class ChainReport:
    ok: bool
    entries: int
    # The first entry that does not verify (0 when the fault is the tail), and why.
    first_bad_seq: int = 0
    reason: str = ""


class ChainVerifier:
    """Walks the log in stored order, one entry at a time (the log may be large), and
    names the first entry that breaks the chain."""

    def __init__(self, key: bytes):
        self._key = key
        self._previous = GENESIS
        self._expected = 1
        self.count = 0
        self.failure: ChainReport | None = None

    def feed(self, entry: AuditEntry) -> bool:
        """Check one entry; False once the chain is broken (stop feeding)."""
        if self.failure is not None:
            return False
        self.count += 1
        if entry.seq != self._expected:
            what = "missing before it" if entry.seq > self._expected else "out of order or duplicated"
            reason = f"entry {entry.seq}: sequence broken ({self._expected} {what})"
            self.failure = ChainReport(False, self.count, entry.seq, reason)
            return False
        if not hmac.compare_digest(chain_mac(self._key, entry, self._previous), entry.mac):
            reason = f"entry {entry.seq}: MAC does not match its content and chain"
            self.failure = ChainReport(False, self.count, entry.seq, reason)
            return False
        self._previous, self._expected = entry.mac, entry.seq + 1
        return True

    def finish(self, head_seq: int, head_mac: str) -> ChainReport:
        """The verdict, given the chain head stored beside the log."""
        if self.failure is not None:
            return self.failure
        last = self._expected - 1
        if last != head_seq or not hmac.compare_digest(self._previous, head_mac):
            return ChainReport(
                False, self.count, 0, f"the log ends at entry {last} but the chain head is at {head_seq}"
            )
        return ChainReport(True, self.count)


async def verify(store: Store, key: bytes) -> ChainReport:
    """Verify the whole audit chain in one consistent read."""
    async with store.read() as tx:
        head_seq, head_mac = await tx.audit.head()
        verifier = ChainVerifier(key)
        async for entry in tx.audit.entries():
            if not verifier.feed(entry):
                break
    return verifier.finish(head_seq, head_mac)
