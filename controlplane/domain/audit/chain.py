"""Who did what: the audit trail every mutation writes in its own transaction.

The domain records entries through `Tx.audit`; the store appends them to the
tamper-evident chain. Who is acting comes from the request context (set by the
transport for operators and nodes, by background jobs for the system itself), so the
domain never passes identities around by hand.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from controlplane.domain.model.audit import AuditEntry, AuditHead

# -- the chain ------------------------------------------------------------------------
#
# Each entry's MAC is HMAC-SHA256(key, canonical(entry) || previous MAC). Editing an
# entry breaks its MAC; deleting, inserting or reordering entries breaks the next one's.
# The chain head kept beside the log (last seq and MAC) is sealed with the same key, so
# cutting the tail and rewriting the head to match is detected too. What the key cannot
# tell apart is an older copy of the whole store (older log, its older sealed head): a
# checkpoint recorded outside (`VerifyAuditChain` answers one) catches that.

GENESIS = "0" * 64
# Domain separation: an entry's MAC input starts with "{", a head seal's with this.
_HEAD_SEAL_CONTEXT = b"controlplane audit head v1\n"
# The entry that records the head being sealed for the first time (a store made, or
# upgraded from before seals existed; the start seals it). A second one means a seal was
# removed (a 0006 downgrade keeps the seal aside, and the next upgrade restores it
# without an entry: `reseal`).
SEAL_ACTION = "audit.seal"
SEAL_ACTOR = "system:audit"


def chained_fields(entry: AuditEntry) -> dict[str, Any]:
    """Every field a MAC covers, by name: all of an entry but its MAC."""
    return {
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


def stored_fields(entry: AuditEntry) -> dict[str, Any]:
    """The entry as stored and exported: the chained fields and the MAC."""
    return {**chained_fields(entry), "mac": entry.mac}


def canonical(entry: AuditEntry) -> bytes:
    """The bytes a MAC covers: every field but the MAC, in a fixed JSON form."""
    return json.dumps(
        chained_fields(entry), sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str
    ).encode()


def chain_mac(key: bytes, entry: AuditEntry, previous_mac: str) -> str:
    return hmac.new(key, canonical(entry) + previous_mac.encode(), hashlib.sha256).hexdigest()


def head_seal(key: bytes, seq: int, mac: str) -> str:
    return hmac.new(key, _HEAD_SEAL_CONTEXT + f"{seq}\n{mac}".encode(), hashlib.sha256).hexdigest()


def seal_matches(key: bytes, head: AuditHead) -> bool:
    return bool(head.seal) and hmac.compare_digest(head_seal(key, head.seq, head.mac), head.seal)


def chain_time(now: str, previous: str) -> str:
    """The time of entries chained after one stamped `previous`: the writer's clock
    `now`, but never earlier than `previous` — a replica whose clock is behind
    another's, or a clock stepped back, would otherwise put a later entry at an earlier
    time. Both are in the one stored ISO form (UTC, microseconds), whose text order is
    time order."""
    return max(now, previous)


def extend(
    key: bytes, head: AuditHead, recorded: Sequence[AuditEntry], at: str
) -> tuple[list[AuditEntry], AuditHead]:
    """Chain a transaction's `recorded` entries (in order; their seq, time and MAC unset)
    onto `head`, all at time `at` (`chain_time`, read under the head's lock): the entries
    to store and the new head.

    A head never sealed is sealed now, behind an entry saying so — even with nothing
    recorded (`AuditLog.seal`). A head whose seal does not match (rewritten without the
    key) keeps its stale seal: the next verification still fails, instead of the new
    entries making the cut look whole."""
    if not recorded and head.seal:
        return [], head
    todo = list(recorded)
    if not head.seal:
        todo.insert(
            0,
            AuditEntry(
                seq=0,
                at=at,
                actor=SEAL_ACTOR,
                action=SEAL_ACTION,
                resource="audit/head",
                project="",
                before=None,
                after={"unsealed_head_seq": head.seq},
                request_id=todo[0].request_id if todo else "",
            ),
        )
    sealed = not head.seal or seal_matches(key, head)
    seq, mac = head.seq, head.mac
    chained = []
    for entry in todo:
        seq += 1
        numbered = replace(entry, seq=seq, at=at)
        mac = chain_mac(key, numbered, mac)
        chained.append(replace(numbered, mac=mac))
    return chained, AuditHead(seq, mac, head_seal(key, seq, mac) if sealed else head.seal)


@dataclass(frozen=True, slots=True)
class KeptSeal:
    """The seal a head had when migration 0006 was undone, kept beside it while the
    seal's column did not exist (the head's seq then, and its seal)."""

    seq: int
    seal: str


def reseal(key: bytes, head: AuditHead, kept: KeptSeal, kept_mac: str) -> AuditHead | None:
    """`head` sealed again without an entry, if it was sealed before 0006 was undone and
    the chain still runs through the head it had then: `kept` must be the seal of that
    head — entry `kept.seq`, whose MAC in the log is now `kept_mac` (GENESIS for 0) — and
    the head at or after it. Entries written meanwhile (by code from before seals)
    chain onto it and are verified as any others. None when `kept` does not prove that:
    the head is then sealed behind an entry (`extend`), as a head whose seal was removed.

    Without the key, a kept seal that passes can only be a head's real seal from the
    past: whoever holds one can already cut the log back to that head and restore it
    with its seal (the older-copy case); kept, it lets them cut back to any entry after
    it as well. A checkpoint recorded outside catches both (`ChainVerifier`)."""
    if head.seal or kept.seq > head.seq:
        return None
    if not hmac.compare_digest(head_seal(key, kept.seq, kept_mac), kept.seal):
        return None
    return AuditHead(head.seq, head.mac, head_seal(key, head.seq, head.mac))


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A chain head recorded outside the control plane (seq 0: none)."""

    seq: int = 0
    mac: str = ""


NO_CHECKPOINT = Checkpoint()


@dataclass(frozen=True, slots=True)
class ChainReport:
    ok: bool
    entries: int
    # The first entry that does not verify (0 when the fault is the tail or head), and why.
    first_bad_seq: int = 0
    reason: str = ""
    # The head the verification read: record it outside as a checkpoint.
    head_seq: int = 0
    head_mac: str = ""


class ChainVerifier:
    """Walks the log in stored order, one entry at a time (the log may be large), and
    names the first entry that breaks the chain."""

    def __init__(self, key: bytes, checkpoint: Checkpoint = NO_CHECKPOINT):
        self._key = key
        self._checkpoint = checkpoint
        self._previous = GENESIS
        self._expected = 1
        self._seals = 0
        self.count = 0
        self.failure: ChainReport | None = None

    def _fail(self, seq: int, reason: str) -> bool:
        self.failure = ChainReport(False, self.count, seq, f"entry {seq}: {reason}")
        return False

    def feed(self, entry: AuditEntry) -> bool:
        """Check one entry; False once the chain is broken (stop feeding)."""
        if self.failure is not None:
            return False
        self.count += 1
        if entry.seq != self._expected:
            what = "missing before it" if entry.seq > self._expected else "out of order or duplicated"
            return self._fail(entry.seq, f"sequence broken ({self._expected} {what})")
        if not hmac.compare_digest(chain_mac(self._key, entry, self._previous), entry.mac):
            return self._fail(entry.seq, "MAC does not match its content and chain")
        if entry.action == SEAL_ACTION and entry.actor == SEAL_ACTOR:
            self._seals += 1
            if self._seals > 1:
                return self._fail(entry.seq, "the chain head was found unsealed again (its seal was removed)")
        if entry.seq == self._checkpoint.seq and not hmac.compare_digest(entry.mac, self._checkpoint.mac):
            return self._fail(entry.seq, "MAC differs from the checkpoint: the log was rewritten since")
        self._previous, self._expected = entry.mac, entry.seq + 1
        return True

    def finish(self, head: AuditHead) -> ChainReport:
        """The verdict, given the chain head stored beside the log."""
        report = self.failure or self._tail(head)
        return replace(report, head_seq=head.seq, head_mac=head.mac)

    def _tail(self, head: AuditHead) -> ChainReport:
        last = self._expected - 1
        if not head.seal:
            return ChainReport(False, self.count, 0, "the chain head is not sealed")
        if not seal_matches(self._key, head):
            return ChainReport(
                False, self.count, 0, "the chain head's seal does not match it: the head was rewritten"
            )
        if last != head.seq or not hmac.compare_digest(self._previous, head.mac):
            return ChainReport(
                False, self.count, 0, f"the log ends at entry {last} but the chain head is at {head.seq}"
            )
        if self._checkpoint.seq > last:
            return ChainReport(
                False,
                self.count,
                0,
                f"the log ends at entry {last}, before the checkpoint at {self._checkpoint.seq}: "
                "it was cut or restored from an older copy",
            )
        return ChainReport(True, self.count)
