"""State-of-the-world ADS (`StreamAggregatedResources`) on top of `session.Session`.

- A request whose `response_nonce` is not the last one sent for its type is stale and
  ignored whole (Envoy's xDS protocol, "resource updates"); one naming the nonce of the
  response awaiting acknowledgement is its ACK, or its NACK when it carries
  `error_detail`.
- Listener and Cluster responses carry every resource of the type the node should hold
  (what is left out is removed); the others carry the subscribed names that exist.
- `version_info` is `<revision>-<content hash>` of exactly what the node holds of the
  type for its subscription: a node that reconnects (to any replica) with the version of
  what it should hold is sent nothing again; the hash decides, so a newer revision that
  did not change a type does not resend it.
- An empty first request for Listener or Cluster is a wildcard subscription (as is
  `*`); the first request of a type gets an answer even if empty, since Envoy waits for
  one before it finishes starting.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from controlplane.xds.session import WILDCARD, Output, Pending, Session, TypeState, added, discarded, shared
from controlplane.xds.snapshot import Resource, type_hash


class SotwSession(Session):
    def receive(self, request: Any) -> Output:
        """Handle one DiscoveryRequest."""
        node = request.node.id if request.HasField("node") else None
        rtype = self._admit(request.type_url, node)
        if rtype is None:
            return Output()
        ts = self.types[rtype.url]
        names = self._check_names(request.resource_names, "resource_names")
        nonce = request.response_nonce
        if not ts.requested:
            if nonce:
                self.stale_requests += 1  # a nonce this stream never sent
                return Output()
            ts.requested = True
            if not names and rtype.full_state:
                self._legacy = added(self._legacy, rtype.url)
            self._subscribe(ts, names)
            self._resume(ts, request.version_info)
        elif nonce != ts.last_nonce:
            self.stale_requests += 1
            return Output()
        else:
            pending = ts.pending
            if pending is not None and nonce == pending.nonce:
                if request.HasField("error_detail"):
                    ts.unknown = True
                    self._refused(ts, pending, request.error_detail.message)
                else:
                    self._ack(ts, pending)
            self._subscribe(ts, names)
        return self._pump()

    def _subscribe(self, ts: TypeState, names: list[str]) -> None:
        url = ts.rtype.url
        if url in self._legacy:
            if not names:
                ts.wildcard = True
                return
            self._legacy = discarded(self._legacy, url)
        ts.wildcard = WILDCARD in names
        ts.names = shared({n for n in names if n != WILDCARD})
        if not ts.wildcard:
            # Names no longer asked for are forgotten: asked again, they are sent again.
            ts.acked = {n: r for n, r in ts.acked.items() if n in ts.names}

    def _resume(self, ts: TypeState, version: str) -> None:
        """A first request: does the node already hold the target's (or base's) content?"""
        ts.unknown = True
        if not version:
            return
        content = version.rsplit("-", 1)[-1]
        for candidate in (self.target, self.base):
            view = ts.view(candidate.resources.of(ts.rtype))
            if type_hash(view.values())[: len(content)] == content and len(content) >= 12:
                ts.acked = view
                ts.acked_version = version
                ts.unknown = False
                return

    def _ack(self, ts: TypeState, pending: Pending) -> None:
        if ts.rtype.full_state:
            ts.acked = pending.resources  # the response's own view, not kept elsewhere
        else:
            ts.acked.update(pending.resources)
        ts.acked_version = pending.version
        ts.unknown = False
        ts.pending = None

    def _wants_send(self, ts: TypeState, offer: Mapping[str, Resource]) -> bool:
        """Send when the version the node acknowledged does not name this view of the
        offer: content changed, or names were added or dropped. A node whose
        subscription shrank gets the rest again under a version naming exactly what it
        holds, so a later resume with that version sends nothing."""
        if ts.unknown:
            return True
        view = ts.view(offer)
        return ts.acked_version.rsplit("-", 1)[-1] != type_hash(view.values())[:12]

    def _send(self, ts: TypeState, offer: Mapping[str, Resource]) -> bytes:
        view = ts.view(offer)
        resources = list(view.values())
        content = type_hash(resources)
        version = f"{self.target.revision}-{content[:12]}"
        nonce = self.nonce(ts, content)
        ts.pending = Pending(nonce, self.target.revision, view, (), version)
        self.resources_sent += len(resources)
        return self.encoder.sotw(ts.rtype.url, version, nonce, content, resources)
