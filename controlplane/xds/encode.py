"""Discovery responses serialized once for every stream that sends the same thing.

A response's nonce and version are derived from the revision, the type and the content
(never from a per-stream counter), so streams that reach the same state send the same
bytes: a fleet-wide change is encoded once, not once per stream.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from envoy.service.discovery.v3 import discovery_pb2

from controlplane.xds.snapshot import Resource

# Distinct responses kept: a rollout step produces a handful per type; a few hundred
# covers many projects changing at once without holding stale bytes for long.
CAPACITY = 512


class Encoder:
    def __init__(self, capacity: int = CAPACITY):
        self._cache: collections.OrderedDict[tuple[object, ...], bytes] = collections.OrderedDict()
        self._capacity = capacity
        self.encoded = 0
        self.shared = 0

    def _get(self, key: tuple[object, ...]) -> bytes | None:
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            self.shared += 1
        return hit

    def _put(self, key: tuple[object, ...], payload: bytes) -> bytes:
        self.encoded += 1
        self._cache[key] = payload
        if len(self._cache) > self._capacity:
            self._cache.popitem(last=False)
        return payload

    def sotw(
        self, type_url: str, version: str, nonce: str, content: str, resources: Sequence[Resource]
    ) -> bytes:
        """A DiscoveryResponse; `content` is the hash of `resources` (names and digests)."""
        key = ("sotw", type_url, version, nonce, content)
        hit = self._get(key)
        if hit is not None:
            return hit
        msg = discovery_pb2.DiscoveryResponse(version_info=version, type_url=type_url, nonce=nonce)
        msg.resources.extend(r.packed() for r in resources)
        return self._put(key, msg.SerializeToString(deterministic=True))

    def delta(
        self,
        type_url: str,
        system_version: str,
        nonce: str,
        content: str,
        resources: Sequence[Resource],
        removed: Sequence[str],
    ) -> bytes:
        """A DeltaDiscoveryResponse; `content` hashes the updates and the removals. Each
        resource's version is `<revision>-<content hash>` (the revision it was sent at,
        which Envoy's config_dump shows; only the hash is compared on resume)."""
        key = ("delta", type_url, system_version, nonce, content)
        hit = self._get(key)
        if hit is not None:
            return hit
        msg = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=system_version, type_url=type_url, nonce=nonce
        )
        for r in resources:
            msg.resources.add(name=r.name, version=f"{system_version}-{r.version}", resource=r.packed())
        msg.removed_resources.extend(removed)
        return self._put(key, msg.SerializeToString(deterministic=True))
