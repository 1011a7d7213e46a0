"""The hub's image of the desired-state log: the latest row of every key, as of one
revision. Pure: no I/O, no streams, no clock; the hub feeds it rows in revision order
and asks it what a node should run.

Besides the rows it keeps two derived maps so routing never scans the log: each known
node's project and labels (from its `meta:` row) and each project's selectors (from its
`sel:` rows). The image never moves backwards: a row older than the one it holds for the
same key changes nothing.

A router node also watches its `route:` key: what it resolves to is its bundle row with
the routing table attached (`DesiredRow.with_routes`), one object per (bundle row,
table row) so the hub's per-batch caches, keyed by object, stay right.
"""

from __future__ import annotations

from collections.abc import Iterable

from controlplane.domain.kernel.labels import Selector, meta_key, node_key, parse_selector_key, route_key
from controlplane.domain.model.desired import ChangeKind, DesiredRow, FeedSnapshot, resolve

# Distinct (project, labels) sets whose matching selectors are remembered.
MAX_LABEL_SETS = 100_000


class LogImage:
    def __init__(self) -> None:
        # The revision the image is complete up to, the oldest a resume may start from,
        # and the history's epoch.
        self.position = 0
        self.floor = 0
        self.epoch = ""
        # Earlier epochs this history continues: the last revision of each it kept.
        self.forks: dict[str, int] = {}
        self.latest: dict[str, DesiredRow] = {}
        self._nodes: dict[str, tuple[str, dict[str, str]]] = {}
        self._selectors: dict[str, dict[str, Selector]] = {}
        # Router node id -> (bundle row, table row, the row its stream resolves to).
        self._routed: dict[str, tuple[DesiredRow | None, DesiredRow, DesiredRow]] = {}
        # (project, labels) -> the selector keys they match. Nodes share label sets, so a
        # reconnect storm or a drift sweep matches each set once; emptied whenever a
        # project's selectors change.
        self._matching: dict[tuple[str, frozenset[tuple[str, str]]], frozenset[str]] = {}

    def load(self, snapshot: FeedSnapshot) -> None:
        """Replace everything with a snapshot (at start, or after the history moved)."""
        self.latest = {}
        self._nodes = {}
        self._selectors = {}
        self._routed = {}
        self._matching = {}
        for row in snapshot.rows:
            self.remember(row)
        self.epoch = snapshot.position.epoch
        self.forks = dict(snapshot.forks)
        self.floor = snapshot.position.floor
        self.position = snapshot.position.head

    def remember(self, row: DesiredRow) -> bool:
        """Take one row; False (and no change) if the image holds a newer row of its key."""
        current = self.latest.get(row.key)
        if current is not None and current.revision > row.revision:
            return False
        self.latest[row.key] = row
        if row.kind is ChangeKind.NODE:
            self._nodes[row.key.split(":", 1)[1]] = (row.project, dict(row.labels or {}))
        elif row.kind is ChangeKind.REVOKED:
            self._nodes.pop(row.key.split(":", 1)[1], None)
        elif (parsed := parse_selector_key(row.key)) is not None and row.key not in self._selectors.get(
            parsed[0], {}
        ):
            self._selectors.setdefault(parsed[0], {})[row.key] = parsed[1]
            self._matching.clear()
        return True

    def forget_below(self, floor: int) -> None:
        """Drop tombstones the floor has passed: retention deletes them, and every cursor
        that could still need one is below the floor and gets a bootstrap."""
        for key, row in list(self.latest.items()):
            if row.kind is ChangeKind.UNASSIGN and row.revision < floor:
                del self.latest[key]
                parsed = parse_selector_key(key)
                if parsed is not None:
                    self._selectors.get(parsed[0], {}).pop(key, None)
                    self._matching.clear()
        self.floor = max(self.floor, floor)

    def node(self, node_id: str) -> tuple[str, dict[str, str]] | None:
        """A known node's project and labels; None for a node the log does not hold (never
        registered, or revoked)."""
        return self._nodes.get(node_id)

    def keys_for(self, project: str, node_id: str, labels: dict[str, str]) -> set[str]:
        """The watch keys whose rows decide what a node with these labels runs."""
        cache_key = (project, frozenset(labels.items()))
        matching = self._matching.get(cache_key)
        if matching is None:
            selectors = self._selectors.get(project, {})
            matching = frozenset(k for k, sel in selectors.items() if sel.matches(labels))
            if len(self._matching) >= MAX_LABEL_SETS:
                self._matching.clear()
            self._matching[cache_key] = matching
        # A new set each time: the hub adds to a stream's keys as selectors appear.
        keys = {node_key(node_id), route_key(node_id)}
        keys |= matching
        return keys

    def resolve(self, keys: Iterable[str], node_id: str) -> DesiredRow | None:
        """What `node_id`'s stream sends: the row that decides its bundle among its `keys`
        (`desired.resolve`), with its routing table attached if it is a router."""
        latest = self.latest
        row = resolve((latest.get(k) for k in keys), node_id)
        table = latest.get(route_key(node_id))
        if table is None or table.kind is not ChangeKind.ROUTES:
            return row
        held = self._routed.get(node_id)
        if held is not None and held[0] is row and held[1] is table:
            return held[2]
        routed = (row or table).with_routes(table)
        self._routed[node_id] = (row, table, routed)
        return routed

    def effective(self, node_id: str) -> DesiredRow | None:
        info = self._nodes.get(node_id)
        if info is None:
            return None
        latest = self.latest
        # The bundle row alone: what the domain compares with what a node runs.
        return resolve((latest.get(k) for k in self.keys_for(info[0], node_id, info[1])), node_id)

    def changed_at(self, keys: Iterable[str], node_id: str) -> int:
        """The newest revision that touched `keys` or the node's own routing row: a
        resume from a cursor at or past it has nothing to catch up on."""
        latest = self.latest
        return max((latest[k].revision for k in (*keys, meta_key(node_id)) if k in latest), default=0)
