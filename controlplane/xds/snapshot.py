"""A node's xDS resources as canonical bytes: versions, hashes and the per-resource diff.

Every resource is kept as the deterministic serialization of its message (with every
nested `Any` re-packed deterministically too), so the same content gives the same bytes,
the same per-resource version and the same type version in every process: a replica
that never served a node can tell that the node already has what it would send.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import any_pb2
from google.protobuf.message import Message

from controlplane.xds import catalog, types
from controlplane.xds.types import ResourceType

# Hex digits of a resource's sha256 used as its version: 64 bits, collision-free for
# any realistic fleet, short enough for Envoy's config_dump and logs.
VERSION_HEX = 16


@dataclass(frozen=True, slots=True)
class Resource:
    """One named resource: its canonical bytes, their digest, and what it refers to."""

    type_url: str
    name: str
    body: bytes
    # The other resources (type URL, name) this one makes Envoy fetch over ADS.
    refs: frozenset[tuple[str, str]] = frozenset()
    digest: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.digest:
            object.__setattr__(self, "digest", hashlib.sha256(self.body).hexdigest())

    @property
    def version(self) -> str:
        return self.digest[:VERSION_HEX]

    def packed(self) -> any_pb2.Any:
        return any_pb2.Any(type_url=self.type_url, value=self.body)


def canonical(message: Message) -> bytes:
    """Deterministic bytes of `message`, nested `Any`s included (maps sorted)."""
    _canonicalize(message)
    return message.SerializeToString(deterministic=True)


def _canonicalize(message: Message) -> None:
    """Re-pack every nested Any with deterministic bytes, innermost first."""
    for fd, value in message.ListFields():
        if fd.message_type is None:
            continue
        values: Iterable[Message]
        if fd.message_type.GetOptions().map_entry:
            if fd.message_type.fields_by_name["value"].message_type is None:
                continue
            values = [value[k] for k in value]
        elif fd.is_repeated:
            values = value
        else:
            values = (value,)
        for item in values:
            if item.DESCRIPTOR.full_name == "google.protobuf.Any":
                _repack(item)
            else:
                _canonicalize(item)


def _repack(any_msg: Any) -> None:
    cls = catalog.message_class(any_msg.type_url.rsplit("/", 1)[-1])
    if cls is None:
        return  # a type this process does not know: keep its bytes as they are
    inner = cls()
    inner.ParseFromString(any_msg.value)
    _canonicalize(inner)
    any_msg.value = inner.SerializeToString(deterministic=True)


def type_hash(resources: Iterable[Resource]) -> str:
    """One hash over a set of resources of a type (names and digests, in name order)."""
    h = hashlib.sha256()
    for r in sorted(resources, key=lambda r: r.name):
        h.update(r.name.encode())
        h.update(b"\x00")
        h.update(r.digest.encode())
        h.update(b"\x00")
    return h.hexdigest()


class ResourceSet(Mapping[str, Mapping[str, Resource]]):
    """Resources by type URL, then by name; immutable once built."""

    __slots__ = ("_by_type", "_digest")

    def __init__(self, resources: Iterable[Resource] = ()):
        by_type: dict[str, dict[str, Resource]] = {t.url: {} for t in types.ORDER}
        for r in resources:
            by_type.setdefault(r.type_url, {})[r.name] = r
        self._by_type = {url: dict(sorted(items.items())) for url, items in by_type.items()}
        h = hashlib.sha256()
        for url in sorted(self._by_type):
            h.update(url.encode() + b"\x00" + type_hash(self._by_type[url].values()).encode())
        self._digest = h.hexdigest()

    def __getitem__(self, type_url: str) -> Mapping[str, Resource]:
        return self._by_type.get(type_url, {})

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_type)

    def __len__(self) -> int:
        return len(self._by_type)

    @property
    def digest(self) -> str:
        """Same resources, same digest, whatever files they came from."""
        return self._digest

    def of(self, rtype: ResourceType) -> Mapping[str, Resource]:
        return self[rtype.url]

    def all(self) -> Iterator[Resource]:
        for items in self._by_type.values():
            yield from items.values()

    def count(self) -> int:
        return sum(len(v) for v in self._by_type.values())


EMPTY = ResourceSet()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a node should run: the resources of one bundle, as of a revision."""

    revision: int
    bundle_digest: str
    resources: ResourceSet


@dataclass(frozen=True, slots=True)
class ResourceChange:
    type_url: str
    name: str

    @property
    def kind(self) -> str:
        return types.short(self.type_url)


@dataclass(frozen=True, slots=True)
class ResourceDiff:
    added: tuple[ResourceChange, ...] = ()
    removed: tuple[ResourceChange, ...] = ()
    changed: tuple[ResourceChange, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def lines(self) -> list[str]:
        """`+ Cluster backend`, `- Listener old`, `~ RouteConfiguration main`."""
        out = [f"+ {c.kind} {c.name}" for c in self.added]
        out += [f"- {c.kind} {c.name}" for c in self.removed]
        out += [f"~ {c.kind} {c.name}" for c in self.changed]
        return out


def diff(old: ResourceSet, new: ResourceSet) -> ResourceDiff:
    """Added, removed and changed resources, by type (make-before-break order) and name."""
    added: list[ResourceChange] = []
    removed: list[ResourceChange] = []
    changed: list[ResourceChange] = []
    urls = [t.url for t in types.ORDER] + sorted((set(old) | set(new)) - set(types.BY_URL))
    for url in urls:
        a, b = old[url], new[url]
        for name in sorted(a.keys() | b.keys()):
            if name not in a:
                added.append(ResourceChange(url, name))
            elif name not in b:
                removed.append(ResourceChange(url, name))
            elif a[name].digest != b[name].digest:
                changed.append(ResourceChange(url, name))
    return ResourceDiff(tuple(added), tuple(removed), tuple(changed))
