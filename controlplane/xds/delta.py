"""Incremental ADS (`DeltaAggregatedResources`) on top of `session.Session`.

- Each resource carries its own version, `<revision>-<content hash>`; a node that
  reconnects (to any replica) with `initial_resource_versions` whose hashes match what
  it should hold is sent nothing again.
- A response updates only what changed and lists what goes in `removed_resources`; a
  subscribed name that does not exist is told so the same way, once.
- The response awaiting acknowledgement is ACKed or NACKed by its nonce; requests with
  no or another nonce only change the subscription (they are incremental, so they are
  applied whatever their nonce).
- An empty first subscription to Listener or Cluster is a wildcard one (as is `*`),
  and is answered even when there is nothing to send, since Envoy waits for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from controlplane.domain.kernel.errors import ResourceExhausted
from controlplane.xds.session import (
    NO_NAMES,
    WILDCARD,
    Output,
    Pending,
    Session,
    TypeState,
    added,
    digest_of,
    discarded,
    shared,
)
from controlplane.xds.snapshot import Resource, type_hash

# What a type's response holds: updates, names removed, subscribed names that do not exist.
Changes = tuple[list[Resource], list[str], list[str]]


class DeltaSession(Session):
    def receive(self, request: Any) -> Output:
        """Handle one DeltaDiscoveryRequest."""
        node = request.node.id if request.HasField("node") else None
        rtype = self._admit(request.type_url, node)
        if rtype is None:
            return Output()
        ts = self.types[rtype.url]
        subscribe = self._check_names(request.resource_names_subscribe, "resource_names_subscribe")
        unsubscribe = self._check_names(request.resource_names_unsubscribe, "resource_names_unsubscribe")
        if not ts.requested:
            initial = dict(request.initial_resource_versions)
            self._check_names(initial, "initial_resource_versions")
            ts.requested = True
            if not subscribe and rtype.full_state:
                self._legacy = added(self._legacy, rtype.url)
                ts.wildcard = True
            self._update(ts, subscribe, unsubscribe, first=True)
            self._seed(ts, initial)
            if not initial and ts.wildcard:
                ts.unknown = True  # answer even with nothing: Envoy waits for a first response
        else:
            nonce = request.response_nonce
            pending = ts.pending
            if nonce and pending is not None and nonce == pending.nonce:
                if request.HasField("error_detail"):
                    for name in (*pending.resources, *pending.removed):
                        ts.acked.pop(name, None)
                        ts.dirty = added(ts.dirty, name)
                    self._refused(ts, pending, request.error_detail.message)
                else:
                    self._ack(ts, pending)
            elif nonce and nonce != ts.last_nonce:
                self.stale_requests += 1
            self._update(ts, subscribe, unsubscribe, first=False)
        return self._pump()

    def _update(self, ts: TypeState, subscribe: list[str], unsubscribe: list[str], first: bool) -> None:
        url = ts.rtype.url
        if subscribe and url in self._legacy:
            # Naming resources ends legacy wildcard mode; the wildcard itself stays until
            # `*` is unsubscribed (Envoy's xDS protocol, "how the client specifies").
            self._legacy = discarded(self._legacy, url)
        for name in subscribe:
            if name == WILDCARD:
                ts.wildcard = True
                continue
            if not first and name in ts.acked:
                ts.dirty = added(ts.dirty, name)  # asked again: the client may have forgotten it
            ts.names = added(ts.names, name)
            ts.told_missing = discarded(ts.told_missing, name)
        for name in unsubscribe:
            if name == WILDCARD:
                ts.wildcard = False
                continue
            ts.names = discarded(ts.names, name)
            ts.told_missing = discarded(ts.told_missing, name)
            if ts.wildcard:
                ts.dirty = added(ts.dirty, name)  # say whether it still exists for the wildcard
            else:
                ts.acked.pop(name, None)
                ts.dirty = discarded(ts.dirty, name)
        if not ts.wildcard:
            ts.acked = {n: r for n, r in ts.acked.items() if n in ts.names}
            if ts.dirty:
                ts.dirty = {n for n in ts.dirty if n in ts.names} or NO_NAMES
        if len(ts.names) > self.limits.max_names:
            raise ResourceExhausted(
                f"more than {self.limits.max_names} names subscribed", field="resource_names_subscribe"
            )
        ts.names = shared(ts.names)

    def _seed(self, ts: TypeState, initial: dict[str, str]) -> None:
        """What a reconnecting node says it holds, matched against target and base."""
        for name, version in initial.items():
            if not ts.subscribed(name):
                continue
            known = None
            content = version.rsplit("-", 1)[-1]
            for candidate in (self.target, self.base):
                r = candidate.resources.of(ts.rtype).get(name)
                if r is not None and r.version == content:
                    known = r
                    break
            if known is None:
                ts.dirty = added(ts.dirty, name)  # something this server cannot tell: resend or remove
            else:
                ts.acked[name] = known
        if ts.acked:
            ts.acked_version = type_hash(ts.acked.values())[:12]

    def _ack(self, ts: TypeState, pending: Pending) -> None:
        for name, r in pending.resources.items():
            ts.acked[name] = r
            ts.dirty = discarded(ts.dirty, name)
        for name in pending.removed:
            ts.acked.pop(name, None)
            ts.dirty = discarded(ts.dirty, name)
        ts.acked_version = type_hash(ts.acked.values())[:12]
        ts.unknown = False
        ts.pending = None

    def _changes(self, ts: TypeState, offer: Mapping[str, Resource]) -> Changes:
        view = ts.view(offer)
        updates = [
            r
            for n, r in view.items()
            if n in ts.dirty or (held := ts.acked.get(n)) is None or held.digest != r.digest
        ]
        known = ts.acked.keys() | ts.dirty
        removed = sorted(n for n in known if n not in view and (ts.wildcard or n in ts.names))
        missing = sorted(n for n in ts.names if n not in view and n not in known and n not in ts.told_missing)
        return updates, removed, missing

    # The changes `_wants_send` found, for `_send` right after it with the same type and
    # offer (the pump asks one, then the other): (type state, offer, changes).
    _planned: tuple[TypeState, Mapping[str, Resource], Changes] | None = None

    def _wants_send(self, ts: TypeState, offer: Mapping[str, Resource]) -> bool:
        changes = self._changes(ts, offer)
        updates, removed, missing = changes
        wants = bool(updates or removed or missing) or ts.unknown
        # Kept only for the send that follows (an idle stream holds no offer).
        self._planned = (ts, offer, changes) if wants else None
        return wants

    def _send(self, ts: TypeState, offer: Mapping[str, Resource]) -> bytes:
        planned, self._planned = self._planned, None
        if planned is not None and planned[0] is ts and planned[1] is offer:
            updates, removed, missing = planned[2]
        else:
            updates, removed, missing = self._changes(ts, offer)
        gone = sorted({*removed, *missing})
        content = digest_of([f"{r.name}={r.digest}" for r in updates] + [f"-{n}" for n in gone])
        nonce = self.nonce(ts, content)
        ts.told_missing = added(ts.told_missing, *missing)
        ts.pending = Pending(nonce, self.target.revision, {r.name: r for r in updates}, tuple(gone))
        self.resources_sent += len(updates)
        return self.encoder.delta(ts.rtype.url, str(self.target.revision), nonce, content, updates, gone)
