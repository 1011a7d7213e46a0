"""Desired state: the rows of the `(key, revision)` log and how a node's effective
desired bundle is resolved from them.

Every change of desired state is a row `(key, revision)`. For each key only its latest
row matters (the log is level-triggered); an UNASSIGN row is a tombstone. A node's
effective state comes from the latest rows of the keys it watches: a pinned assignment
first, otherwise the assignment with the highest revision — with two refinements for the
**baseline** a successful rollout leaves on its selector (`DesiredRow.baseline`):

- a baseline row does not apply to the nodes it excludes (`DesiredRow.exclude`: those
  that refused the bundle in that rollout, a blue-green rollout's standby set, nodes
  another active rollout held when it was written);
- a baseline row does not outrank the node's own key when that key already assigns the
  same bundle at the same weight: the nodes the rollout moved keep the row that moved
  them, so its success sends them nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from controlplane.domain.model.routing import RouteTable


class ChangeKind(enum.StrEnum):
    ASSIGN = "assign"
    # Tombstone: the key no longer assigns anything.
    UNASSIGN = "unassign"
    # A node's routing data (its labels) changed; only on `meta:<id>` keys.
    NODE = "node"
    # The node's identity was revoked: its streams end. Only on `meta:<id>` keys.
    REVOKED = "revoked"
    # A router's routing table; only on `route:<id>` keys (a tombstone withdraws it).
    ROUTES = "routes"


@dataclass(frozen=True, slots=True)
class DesiredRow:
    """One row of the desired-state log."""

    key: str
    revision: int
    project: str
    kind: ChangeKind
    digest: str = ""
    pinned: bool = False
    traffic_weight: int = 100
    size_bytes: int = 0
    annotations: Mapping[str, str] = field(default_factory=dict)
    signature: bytes = b""
    key_id: str = ""
    # Set for NODE rows: the node's labels from this revision on.
    labels: Mapping[str, str] | None = None
    # Wall clock of the write, seconds since the epoch; for latency metrics only.
    written_at: float = 0.0
    # W3C traceparent of the span that wrote it (empty when not tracing); the hub
    # replaces it with its own span's when it routes the row (watch/tracing.py).
    trace_parent: str = ""
    # Set on a selector row a successful rollout wrote: that rollout's id.
    baseline: str = ""
    # Node ids a baseline row does not apply to.
    exclude: frozenset[str] = frozenset()
    # ROUTES rows: the table. On the row a router's stream resolves to (`with_routes`),
    # the router's table and the revision of the row that carried it.
    routes: RouteTable | None = None
    routes_revision: int = 0

    def with_routes(self, table: DesiredRow) -> DesiredRow:
        """This row as a router's stream sends it: its bundle, plus the routing table of
        the ROUTES row `table`."""
        return replace(self, routes=table.routes, routes_revision=table.revision)

    @property
    def is_assignment(self) -> bool:
        return self.kind is ChangeKind.ASSIGN

    def applies_to(self, node_id: str) -> bool:
        return self.kind is ChangeKind.ASSIGN and node_id not in self.exclude


@dataclass(frozen=True, slots=True)
class Effective:
    """The bundle a node should run, and which assignment chose it."""

    digest: str
    assigned_revision: int
    source_key: str
    traffic_weight: int
    pinned: bool
    size_bytes: int
    annotations: Mapping[str, str]
    # A router's routing table revision (0: none): a new one is a change to send.
    routes_revision: int = 0

    @classmethod
    def of(cls, row: DesiredRow) -> Effective:
        return cls(
            digest=row.digest,
            assigned_revision=row.revision,
            source_key=row.key,
            traffic_weight=row.traffic_weight,
            pinned=row.pinned,
            size_bytes=row.size_bytes,
            annotations=row.annotations,
            routes_revision=row.routes_revision,
        )

    def unchanged_from(self, other: Effective | None) -> bool:
        """True when `other` is the same assignment: nothing to tell the node.

        A new assignment of the same bundle is a change: it is how an operator asks a
        node that rejected a bundle to try again, and how drift remediation re-asserts
        what a node should run. The agent skips re-installing a digest it already runs.
        """
        return other is not None and (
            self.assigned_revision,
            self.source_key,
            self.digest,
            self.traffic_weight,
            self.pinned,
            self.routes_revision,
        ) == (
            other.assigned_revision,
            other.source_key,
            other.digest,
            other.traffic_weight,
            other.pinned,
            other.routes_revision,
        )


def resolve(latest_rows: Iterable[DesiredRow | None], node_id: str = "") -> DesiredRow | None:
    """The row that decides `node_id`'s desired state, from the latest row of each of its
    keys.

    Pins win over everything; among equals the highest revision wins. Tombstones, missing
    keys and baseline rows excluding the node contribute nothing; a winning baseline row
    yields to the node's own key when that assigns the same bundle at the same weight.
    """
    best: DesiredRow | None = None
    own: DesiredRow | None = None
    own_key = f"node:{node_id}"
    for row in latest_rows:
        if row is None or not row.applies_to(node_id):
            continue
        if row.key == own_key:
            own = row
        if best is None or (row.pinned, row.revision) > (best.pinned, best.revision):
            best = row
    if (
        best is not None
        and best.baseline
        and own is not None
        and (own.digest, own.traffic_weight) == (best.digest, best.traffic_weight)
    ):
        return own
    return best


@dataclass(frozen=True, slots=True)
class Assignment:
    """A desired-state write: one bundle for a set of keys, at one revision."""

    project: str
    keys: tuple[str, ...]
    digest: str
    size_bytes: int
    traffic_weight: int = 100
    pinned: bool = False
    annotations: Mapping[str, str] = field(default_factory=dict)
    signature: bytes = b""
    key_id: str = ""
    # A rollout's baseline (see DesiredRow): the rollout's id, and the nodes it skips.
    baseline: str = ""
    exclude: frozenset[str] = frozenset()

    def rows(self, revision: int, written_at: float, trace_parent: str = "") -> list[DesiredRow]:
        return [
            DesiredRow(
                key=key,
                revision=revision,
                project=self.project,
                kind=ChangeKind.ASSIGN,
                digest=self.digest,
                pinned=self.pinned,
                traffic_weight=self.traffic_weight,
                size_bytes=self.size_bytes,
                annotations=dict(self.annotations),
                signature=self.signature,
                key_id=self.key_id,
                written_at=written_at,
                trace_parent=trace_parent,
                baseline=self.baseline,
                exclude=self.exclude,
            )
            for key in self.keys
        ]


@dataclass(frozen=True, slots=True)
class FeedPosition:
    """Where the desired-state log stands: newest revision, retention floor, epoch."""

    head: int
    floor: int
    epoch: str


@dataclass(frozen=True, slots=True)
class FeedSnapshot:
    """The latest row of every key, read consistently at `position.head`."""

    position: FeedPosition
    rows: list[DesiredRow]
    # The earlier epochs this history continues, each with the last revision of it that
    # is kept: a cursor of one of them at or below that revision lost nothing.
    forks: Mapping[str, int] = field(default_factory=dict)
