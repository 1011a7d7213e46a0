"""One ADS stream's protocol state, shared by state of the world and delta.

A session moves one node from what it holds to its target (the desired resources at a
revision), in stages, so nothing Envoy uses disappears before what replaces it is in
place (make before break, both ways):

    stage 0  clusters: the target's, plus those the node holds (nothing removed yet);
             endpoints and secrets: the target's, old ones kept. Listeners and routes wait.
    stage 1  once the clusters Envoy holds have their endpoints and secrets acknowledged:
             listeners and routes of the target (old routes still kept).
    stage 2  once the listeners' routes and secrets are acknowledged: everything is the
             target's; clusters, endpoints, routes and secrets no longer used go.

At most one response per type is unacknowledged at a time: the next waits for Envoy's
ACK or NACK, which bounds what a stream holds and is how the stages know a step has
landed. A stage that waits past `Limits.gate_timeout` (Envoy's own 15 s wait for a
resource) moves on anyway, so a client that never asks for a resource cannot stall it.

When every type of the target is acknowledged the node is ACTIVE there and that
revision becomes the one it runs (`base`). A NACK of any type makes it FAILED at the
target, and the target becomes `base` again: the stages run backwards to the last
configuration accepted whole. A refused revision is not offered again until a newer one
arrives (no resend loop); if putting `base` back is refused too, that type is parked.

Subclasses (`sotw.SotwSession`, `delta.DeltaSession`) read requests and build responses;
this class decides what each type should offer and when.
"""

from __future__ import annotations

import collections
import hashlib
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from controlplane.domain.kernel.errors import InvalidArgument, PermissionDenied, ResourceExhausted
from controlplane.xds import types
from controlplane.xds.encode import Encoder
from controlplane.xds.snapshot import EMPTY, Resource, Snapshot
from controlplane.xds.status import Nack, NodeXdsStatus, Phase
from controlplane.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, ResourceType

NOTHING = Snapshot(0, "", EMPTY)
WILDCARD = "*"
RECENT_NONCES = 16
# The set of names a TypeState holds until it holds one: shared, so an idle stream's
# unrequested types and empty sets cost nothing (an empty set is 216 bytes; a session
# has 15 of them otherwise). Sets are changed only through `added`, `discarded`, which
# copy a frozen set (this one, or one from `shared`) rather than change it.
NO_NAMES: frozenset[str] = frozenset()


def added(names: AbstractSet[str], *new: str) -> AbstractSet[str]:
    """`names` with `new` in it: the same set, or a set of its own for a shared empty one."""
    if not new:
        return names
    if isinstance(names, set):
        names.update(new)
        return names
    return {*names, *new}


def discarded(names: AbstractSet[str], name: str) -> AbstractSet[str]:
    """`names` without `name`; the shared empty set once nothing is left."""
    if name not in names:
        return names
    if not isinstance(names, set):
        return (names - {name}) or NO_NAMES  # a shared set (`shared`) is not changed
    names.discard(name)
    return names or NO_NAMES


# Small sets of subscribed names, one frozen copy each for every stream holding the
# same (every Envoy of a fleet asks for the same route configurations): a set of 10
# names is 512-728 bytes a stream otherwise. Bounded; forgetting one changes nothing
# for the streams that hold it.
SHARED_SETS = 1024
SHARED_SET_NAMES = 64
_shared: dict[frozenset[str], frozenset[str]] = {}


def shared(names: AbstractSet[str]) -> AbstractSet[str]:
    """`names`, or the same names as a frozen set shared between streams."""
    if not names:
        return NO_NAMES
    if len(names) > SHARED_SET_NAMES:
        return names
    key = frozenset(names)
    found = _shared.get(key)
    if found is None:
        if len(_shared) >= SHARED_SETS:
            _shared.clear()
        found = _shared[key] = key
    return found


@dataclass(frozen=True)
class Limits:
    # Resource names in one request, and subscribed per type: a bundle holds at most
    # 10,000 resources (resources.MAX_RESOURCES), so a client never needs more.
    max_names: int = 10_000
    # Envoy's names are short; xdstp:// URLs stay well under this.
    max_name_length: int = 2048
    max_type_url: int = 512
    # Requests per stream: Envoy sends one per response plus subscription changes, a few
    # a second at most; a client past this for long is a flood and its stream ends.
    burst: int = 200
    rate: float = 50.0
    # Envoy waits 15 s (initial_fetch_timeout) for a resource it asked for.
    gate_timeout: float = 15.0
    # Envoy's error_detail is kept (for the node's status) up to this many characters.
    max_error: int = 4096
    # Type URLs outside the served types that a stream remembers having ignored.
    max_ignored: int = 16


@dataclass(slots=True)
class Pending:
    nonce: str
    # The target revision it was sent for.
    revision: int
    # What the node holds of this type once it acknowledges (SotW: the whole response;
    # delta: the updated resources).
    resources: dict[str, Resource]
    removed: tuple[str, ...] = ()
    version: str = ""


@dataclass(slots=True)
class TypeState:
    rtype: ResourceType
    requested: bool = False
    wildcard: bool = False
    names: AbstractSet[str] = NO_NAMES
    # What the node holds, as far as the session knows.
    acked: dict[str, Resource] = field(default_factory=dict)
    acked_version: str = ""
    # SotW: the node's content of this type is unknown (never sent on this stream, no
    # matching version, or a NACK left it half applied): the offer is sent regardless.
    unknown: bool = False
    # Delta: names whose content on the node is unknown (resend, or remove).
    dirty: AbstractSet[str] = NO_NAMES
    # Delta: subscribed names already told they do not exist.
    told_missing: AbstractSet[str] = NO_NAMES
    pending: Pending | None = None
    last_nonce: str = ""
    # The last RECENT_NONCES nonces sent (a tuple: most types send a few in a stream's
    # life, and an empty deque costs ~600 bytes a type on every idle stream, a list 56).
    recent: tuple[str, ...] = ()
    # Putting `base` back was refused: nothing more is sent until a new target.
    parked: bool = False

    def subscribed(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def view(self, offer: Mapping[str, Resource]) -> dict[str, Resource]:
        """The part of `offer` this subscription receives."""
        if self.wildcard:
            return {n: offer[n] for n in sorted(offer)}
        return {n: offer[n] for n in sorted(self.names) if n in offer}


@dataclass
class Output:
    """What to send (in order) and the node's status, when it changed."""

    sends: list[bytes] = field(default_factory=list)
    status: NodeXdsStatus | None = None


class Session:
    def __init__(
        self,
        node_id: str,
        target: Snapshot,
        base: Snapshot | None = None,
        encoder: Encoder | None = None,
        limits: Limits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.node_id = node_id
        # The name an Envoy enrolled on first contact goes by (its `node.id`), if any.
        self.alias = ""
        self.target = target
        # The last configuration the node accepted whole (from its record when the stream
        # opens; then whatever this stream brings to ACTIVE).
        self.base = base or NOTHING
        self.encoder = encoder or Encoder()
        self.limits = limits or Limits()
        self._clock = clock
        self.types: dict[str, TypeState] = {t.url: TypeState(t) for t in types.ORDER}
        self.stage = 0
        self._stage_since = clock()
        self.reverting = False
        self.failed: Nack | None = None
        self.last_nack: Nack | None = None
        self._failed_revision = 0
        self._failed_digest = ""
        self._status: NodeXdsStatus | None = None
        self._node_seen = False
        self._tokens = float(self.limits.burst)
        self._refilled = clock()
        self._counter = 0
        self.ignored: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.stale_requests = 0
        self.gate_timeouts = 0
        # Resources sent, in all: a resume that sends nothing again leaves it at 0.
        self.resources_sent = 0
        # Types still in legacy wildcard mode (an empty first request, no names since).
        self._legacy: AbstractSet[str] = NO_NAMES
        # Offers by type URL while a pump runs (see _pump_stages); None otherwise.
        self._offers: dict[str, dict[str, Resource] | None] | None = None

    # -- inputs ------------------------------------------------------------------------

    def receive(self, request: Any) -> Output:
        """Handle one request of the stream (a DiscoveryRequest or DeltaDiscoveryRequest)."""
        raise NotImplementedError

    def set_target(self, snapshot: Snapshot) -> Output:
        """The node's desired resources changed (a new revision)."""
        if snapshot.revision <= self._failed_revision:
            return Output()  # refused already: wait for a newer revision
        same = snapshot.resources.digest == self.target.resources.digest and not self.reverting
        self.target = snapshot
        self.reverting = False
        self.failed = None
        if not same:
            self._restart()
            for ts in self.types.values():
                ts.parked = False
        return self._pump()

    def tick(self) -> Output:
        """Time passed: a stage that waited past the gate timeout moves on."""
        return self._pump()

    @property
    def staging(self) -> bool:
        """A stage is still open, so `tick` may move it on; once the last stage is
        reached only a request or a new target changes anything."""
        return self.stage < 2

    # -- the request side, for subclasses -------------------------------------------------

    def _admit(self, type_url: str, node_id: str | None) -> ResourceType | None:
        """Flood and shape checks every request passes; the type, or None if not served."""
        now = self._clock()
        lim = self.limits
        self._tokens = min(float(lim.burst), self._tokens + (now - self._refilled) * lim.rate)
        self._refilled = now
        if self._tokens < 1.0:
            raise ResourceExhausted(
                f"more than {lim.burst} requests in a burst (or {lim.rate:g} a second) on one stream"
            )
        self._tokens -= 1.0
        if node_id and node_id != self.node_id and not (self.alias and node_id == self.alias):
            raise PermissionDenied(
                f"this stream belongs to node {self.node_id!r}, not {node_id[:128]!r}", field="node.id"
            )
        if not self._node_seen:
            if not node_id:
                raise InvalidArgument("the first request of a stream must carry the node", field="node.id")
            self._node_seen = True
        if not type_url:
            raise InvalidArgument("an ADS request must name its resource type", field="type_url")
        if len(type_url) > lim.max_type_url:
            raise InvalidArgument(f"longer than {lim.max_type_url} characters", field="type_url")
        rtype = types.BY_URL.get(type_url)
        if rtype is None:
            # Not a type this server serves (Runtime, VirtualHost...): the protocol lets a
            # server leave it unanswered; the client's own timeout applies.
            self.ignored[type_url] = self.ignored.pop(type_url, 0) + 1
            if len(self.ignored) > lim.max_ignored:
                self.ignored.popitem(last=False)
        return rtype

    def _check_names(self, names: Iterable[str], what: str) -> list[str]:
        out = list(names)
        lim = self.limits
        if len(out) > lim.max_names:
            raise ResourceExhausted(f"{len(out)} names, over the limit of {lim.max_names}", field=what)
        for name in out:
            if len(name) > lim.max_name_length:
                raise InvalidArgument(f"a name longer than {lim.max_name_length} characters", field=what)
        # One copy of each name for every stream that keeps it (every Envoy of a fleet
        # asks for the same route configurations): each request's are fresh strings.
        return [sys.intern(name) for name in out]

    def _refused(self, ts: TypeState, pending: Pending, error: str) -> None:
        """Envoy NACKed `pending`: record it, then put back the last good configuration."""
        ts.pending = None
        error = error[: self.limits.max_error] or "(no error detail)"
        nack = Nack(pending.revision, ts.rtype.url, error)
        self.last_nack = nack
        if self.reverting:
            # Putting `base` back was refused as well: stop offering this type.
            ts.parked = True
            first = f"{self.failed.error}; " if self.failed is not None else ""
            again = f"{first}restoring revision {self.base.revision} was refused too: {error}"
            self.failed = Nack(self._failed_revision, ts.rtype.url, again[: self.limits.max_error])
            return
        if pending.revision != self.target.revision:
            return  # a response for an older target; the current one is offered next
        self.failed = nack
        self._failed_revision = self.target.revision
        self._failed_digest = self.target.bundle_digest
        self.target = self.base
        self.reverting = True
        self._restart()

    def _restart(self) -> None:
        self.stage = 0
        self._stage_since = self._clock()

    # -- what each type offers -------------------------------------------------------------

    def offer(self, rtype: ResourceType) -> dict[str, Resource] | None:
        """The resources `rtype` should hold at this stage; None: hold it for now."""
        memo = self._offers
        if memo is None:
            return self._offer(rtype)
        if rtype.url not in memo:
            memo[rtype.url] = self._offer(rtype)
        return memo[rtype.url]

    def _offer(self, rtype: ResourceType) -> dict[str, Resource] | None:
        if rtype in (LISTENER, ROUTE) and self.stage == 0:
            return None
        target = self.target.resources.of(rtype)
        if rtype is LISTENER or self.stage >= 2:
            return dict(target)
        ts = self.types[rtype.url]
        out = dict(target)
        for name, r in ts.acked.items():
            out.setdefault(name, r)
        if ts.unknown or ts.dirty:
            # What the node holds is not known exactly: keep what it last ran whole too.
            for name, r in self.base.resources.of(rtype).items():
                out.setdefault(name, r)
        return out

    def settled(self, ts: TypeState) -> bool:
        """Nothing to send for this type and nothing unacknowledged."""
        if not ts.requested or ts.parked:
            return True
        if ts.pending is not None:
            return False
        offer = self.offer(ts.rtype)
        if offer is None:
            return True  # held until a later stage
        return not self._wants_send(ts, offer)

    def _wants_send(self, ts: TypeState, offer: Mapping[str, Resource]) -> bool:
        raise NotImplementedError

    def _send(self, ts: TypeState, offer: Mapping[str, Resource]) -> bytes | None:
        raise NotImplementedError

    def _ref_settled(self, url: str, name: str) -> bool:
        ts = self.types[url]
        if not ts.subscribed(name) or ts.pending is not None:
            return False
        want = self.target.resources[url].get(name)
        have = ts.acked.get(name)
        return want is not None and have is not None and have.digest == want.digest and name not in ts.dirty

    def _refs_settled(self, holder: ResourceType, ref_types: tuple[ResourceType, ...]) -> bool:
        """The resources fetched by name for what the node holds of `holder` are acked."""
        held = self.types[holder.url].acked
        target = self.target.resources.of(holder)
        urls = {t.url for t in ref_types}
        for name, r in held.items():
            if name not in target or target[name].digest != r.digest:
                continue
            for url, ref in r.refs:
                if url in urls and not self._ref_settled(url, ref):
                    return False
        return True

    def _gate(self) -> bool:
        """May the session move to the next stage?"""
        if self.stage == 0:
            return self.settled(self.types[CLUSTER.url]) and self._refs_settled(CLUSTER, (ENDPOINT, SECRET))
        if self.stage == 1:
            return (
                self.settled(self.types[LISTENER.url])
                and self.settled(self.types[ROUTE.url])
                and self._refs_settled(LISTENER, (ROUTE, SECRET))
            )
        return False

    # -- the engine ------------------------------------------------------------------------

    def _pump(self) -> Output:
        try:
            return self._pump_stages()
        finally:
            self._offers = None

    def _pump_stages(self) -> Output:
        sends: list[bytes] = []
        while True:
            # Within one stage of one pump an offer does not change (sending only sets a
            # type's pending response): the sends and the gate below share each one.
            self._offers = {}
            for rtype in types.ORDER:
                ts = self.types[rtype.url]
                if not ts.requested or ts.parked or ts.pending is not None:
                    continue
                offer = self.offer(rtype)
                if offer is None or not self._wants_send(ts, offer):
                    continue
                payload = self._send(ts, offer)
                if payload is not None:
                    sends.append(payload)
            if self.stage >= 2:
                break
            if self._gate():
                self.stage += 1
                self._stage_since = self._clock()
                continue
            if self._clock() - self._stage_since >= self.limits.gate_timeout:
                self.gate_timeouts += 1
                self.stage += 1
                self._stage_since = self._clock()
                continue
            break
        return Output(sends, self._report())

    def _complete(self) -> bool:
        """Every type of the target acknowledged, nothing pending."""
        if self.stage < 2:
            return False
        for rtype in types.ORDER:
            ts = self.types[rtype.url]
            if not self.settled(ts):
                return False
            if rtype.full_state and self.target.resources.of(rtype) and not ts.requested:
                return False  # Envoy has not asked for its listeners (or clusters) yet
        return True

    def _report(self) -> NodeXdsStatus | None:
        if self._complete() and not self.reverting:
            self.base = self.target
        acked = {url: ts.acked_version for url, ts in self.types.items() if ts.acked_version}
        if self.failed is not None:
            status = NodeXdsStatus(
                Phase.FAILED,
                self.failed.revision,
                self._failed_digest,
                self.base.revision,
                self.base.bundle_digest,
                f"{types.short(self.failed.type_url)}: {self.failed.error}",
                acked,
                self.last_nack,
            )
        else:
            phase = Phase.ACTIVE if self.base is self.target else Phase.PENDING
            status = NodeXdsStatus(
                phase,
                self.target.revision,
                self.target.bundle_digest,
                self.base.revision,
                self.base.bundle_digest,
                "",
                acked,
                self.last_nack,
            )
        if status.same_as(self._status):
            return None
        self._status = status
        return status

    @property
    def status(self) -> NodeXdsStatus | None:
        return self._status

    def nonce(self, ts: TypeState, content: str) -> str:
        """(revision, type, content): unique within the stream, shared across streams."""
        nonce = f"{self.target.revision}-{ts.rtype.code}-{content[:10]}"
        if nonce in ts.recent or nonce == ts.last_nonce:
            self._counter += 1
            nonce = f"{nonce}~{self._counter}"
        ts.recent = (*ts.recent[1 - RECENT_NONCES :], nonce)
        ts.last_nonce = nonce
        return nonce


def digest_of(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\x00")
    return h.hexdigest()
