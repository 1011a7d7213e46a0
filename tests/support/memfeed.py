"""An in-memory desired-state log that serves the hub like the SQL feed does."""

from __future__ import annotations

from controlplane.domain.kernel.labels import meta_key, route_key
from controlplane.domain.model.desired import Assignment, ChangeKind, DesiredRow, FeedPosition, FeedSnapshot
from controlplane.domain.model.routing import RoutedBackend, RouteTable


class MemoryFeed:
    def __init__(self, epoch: str = "epoch-1"):
        self.rows: list[DesiredRow] = []
        # Every row ever written, never pruned: what a model checks against.
        self.history: list[DesiredRow] = []
        self.head = 0
        self.floor = 0
        self.epoch = epoch
        # Earlier epochs this history continues, with the last revision kept of each.
        self.forks: dict[str, int] = {}
        self.fail = False

    def _check(self) -> None:
        if self.fail:
            raise ConnectionError("feed unavailable")

    async def position(self) -> FeedPosition:
        self._check()
        return FeedPosition(self.head, self.floor, self.epoch)

    async def changes(self, after: int, upto: int) -> list[DesiredRow]:
        self._check()
        if self.floor > after:
            return []  # like the SQL feed: never a range retention may have holed
        return sorted((r for r in self.rows if after < r.revision <= upto), key=lambda r: (r.revision, r.key))

    async def snapshot(self) -> FeedSnapshot:
        self._check()
        latest: dict[str, DesiredRow] = {}
        for row in sorted(self.rows, key=lambda r: r.revision):
            latest[row.key] = row
        return FeedSnapshot(
            FeedPosition(self.head, self.floor, self.epoch), list(latest.values()), dict(self.forks)
        )

    # -- writes (what the store does in one transaction) ---------------------------

    def fork(self, keep: int, epoch: str) -> None:
        """A promoted asynchronous standby (store/epochs.py): every revision above `keep`
        is lost, and the new epoch records that it continues this one up to `keep`."""
        assert self.floor <= keep <= self.head
        self.forks = {self.epoch: keep, **{e: min(k, keep) for e, k in self.forks.items()}}
        self.epoch = epoch
        self.rows = [r for r in self.rows if r.revision <= keep]
        self.history = [r for r in self.history if r.revision <= keep]
        self.head = keep

    def prune(self, floor: int) -> None:
        """What the SQL feed's retention does: superseded rows and lone tombstones
        below the floor go; the latest assignment of a key stays."""
        self.floor = max(self.floor, floor)
        newest: dict[str, int] = {}
        for row in self.rows:
            newest[row.key] = max(newest.get(row.key, 0), row.revision)
        kept = []
        for row in self.rows:
            superseded = row.revision < newest[row.key]
            lone_tombstone = row.kind is ChangeKind.UNASSIGN and row.revision == newest[row.key]
            if row.revision < self.floor and (superseded or lone_tombstone):
                continue
            kept.append(row)
        self.rows = kept

    def _next(self) -> int:
        self.head += 1
        return self.head

    def node(self, node_id: str, labels: dict[str, str], project: str = "p") -> int:
        revision = self._next()
        self._write([DesiredRow(meta_key(node_id), revision, project, ChangeKind.NODE, labels=dict(labels))])
        return revision

    def assign(self, keys: tuple[str, ...], digest: str, project: str = "p", pinned: bool = False) -> int:
        revision = self._next()
        self._write(Assignment(project, keys, digest, 10, pinned=pinned).rows(revision, 0.0))
        return revision

    def unassign(self, keys: tuple[str, ...], project: str = "p") -> int:
        revision = self._next()
        self._write([DesiredRow(k, revision, project, ChangeKind.UNASSIGN) for k in keys])
        return revision

    def routes(self, router: str, backends: dict[str, int], project: str = "p") -> int:
        """A routing table for `router`: each backend node at 127.0.0.1 with its weight."""
        revision = self._next()
        table = RouteTable(
            "env=prod",
            "app",
            tuple(
                RoutedBackend(n, f"127.0.0.1:{8000 + i}", w)
                for i, (n, w) in enumerate(sorted(backends.items()))
            ),
        )
        self._write([DesiredRow(route_key(router), revision, project, ChangeKind.ROUTES, routes=table)])
        return revision

    def revoke(self, node_id: str, project: str = "p") -> int:
        revision = self._next()
        self._write([DesiredRow(meta_key(node_id), revision, project, ChangeKind.REVOKED)])
        return revision

    def _write(self, rows: list[DesiredRow]) -> None:
        self.rows += rows
        self.history += rows
