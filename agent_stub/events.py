"""Applying one stream's events in order, and moving the cursor only behind them.

The watch loop hands every response here. Events are handled one after the other, so by
the time a `snapshot_end` or `bookmark` is reached everything before it is applied, and
the cursor may move to its revision. Desired states are level-triggered: of several in
one response only the last is applied.

A router's desired state also carries its routing table (`DesiredState.router`). It is
applied after the bundle, and the one report at that revision covers both: ACTIVE when
the proxy runs the bundle and the table, FAILED with the proxy's words when it refused
either. A refused table never parks the bundle: the next table is tried afresh.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from agent_stub.applier import Installer, Target
from agent_stub.errors import ApplyFailed
from agent_stub.logs import EventLog
from agent_stub.reporter import Reporter
from agent_stub.state import Cursor, Failure, StateStore
from agent_stub.tracing import apply_span
from controlplane.api.watch.v1 import watch_pb2 as pb
from controlplane.proxies import routes


@dataclass
class StreamInfo:
    """What the `started` event told us about the current stream."""

    stream_id: str = ""
    epoch: str = ""
    mode: str = ""
    head_revision: int = 0
    floor_revision: int = 0


@dataclass
class Counters:
    streams: int = 0
    bootstraps: int = 0
    resumes: int = 0
    resets: int = 0
    applied: int = 0
    failed: int = 0
    parked: int = 0
    unchanged: int = 0
    bookmarks: int = 0
    # Routing tables applied and refused (router nodes).
    routed: int = 0
    route_refused: int = 0


class EventHandler:
    def __init__(
        self,
        state: StateStore,
        installer: Installer,
        reporter: Reporter,
        log: EventLog,
        node_id: str = "",
    ):
        self.state = state
        self.installer = installer
        self.reporter = reporter
        self.log = log
        self.node_id = node_id
        self.cursor: Cursor = state.load_cursor()
        self.stream = StreamInfo()
        self.counters = Counters()

    # -- cursor ----------------------------------------------------------------------

    def _persist(self, cursor: Cursor) -> None:
        if cursor != self.cursor:
            self.state.save_cursor(cursor)
            self.cursor = cursor

    def adopt(self, node_id: str) -> None:
        """Streams are now for `node_id`. A cursor received for another node is useless:
        start over with a bootstrap (the bundle on disk stays and is kept if unchanged)."""
        self.node_id = node_id
        cursor = self.cursor
        if cursor.node_id == node_id:
            return
        if cursor.node_id and cursor.revision:
            self.log.warning(
                "cursor.dropped", detail=f"cursor was for node {cursor.node_id}", revision=cursor.revision
            )
            cursor = replace(cursor, revision=0, epoch="", failed=None)
        self._persist(replace(cursor, node_id=node_id))

    # -- events ----------------------------------------------------------------------

    async def handle(self, response: pb.WatchBundlesResponse) -> bool:
        """Process one response; True when it ended with a closing bookmark."""
        events = list(response.events)
        last_desired = max(
            (i for i, e in enumerate(events) if e.WhichOneof("event") == "desired"), default=-1
        )
        closing = False
        for i, event in enumerate(events):
            kind = event.WhichOneof("event")
            if kind == "started":
                await self._started(event.started)
            elif kind == "reset":
                self._reset(event.reset)
            elif kind == "desired":
                if i == last_desired:
                    await self._desired(event.desired)
                else:
                    self.log.debug("desired.superseded", revision=event.desired.revision)
            elif kind == "snapshot_end":
                self._advance(event.snapshot_end.revision)
                self.log.info("snapshot.end", revision=event.snapshot_end.revision)
            elif kind == "bookmark":
                self.counters.bookmarks += 1
                self._advance(event.bookmark.revision)
                if self.reporter.pending is not None:
                    await self.reporter.flush()
                if event.bookmark.closing:
                    closing = True
                    self.log.info("stream.closing", revision=event.bookmark.revision)
            else:
                self.log.warning("event.unknown", kind=kind)
        return closing

    async def _started(self, started: pb.StreamStarted) -> None:
        mode = pb.StreamMode.Name(started.mode).removeprefix("STREAM_MODE_")
        self.stream = StreamInfo(
            started.stream_id, started.epoch, mode, started.head_revision, started.floor_revision
        )
        self.counters.streams += 1
        if started.mode == pb.STREAM_MODE_BOOTSTRAP:
            self.counters.bootstraps += 1
        elif started.mode == pb.STREAM_MODE_RESUME:
            self.counters.resumes += 1
        self.log.set(stream=started.stream_id)
        self.log.info(
            "stream.started",
            mode=mode,
            revision=self.cursor.revision,
            head=started.head_revision,
            floor=started.floor_revision,
            epoch=started.epoch,
        )
        await self.reporter.flush()

    def _reset(self, reset: pb.Reset) -> None:
        self.counters.resets += 1
        self.log.warning(
            "stream.reset",
            reason=pb.ResetReason.Name(reset.reason).removeprefix("RESET_REASON_"),
            revision=self.cursor.revision,
            floor=reset.floor_revision,
            head=reset.head_revision,
            epoch=reset.epoch,
        )
        # Our cursor is unusable: forget it so a crash before the snapshot ends bootstraps.
        self._persist(replace(self.cursor, revision=0, epoch=reset.epoch))

    def _advance(self, revision: int) -> None:
        self._persist(self.cursor.advanced(revision, self.stream.epoch))

    async def _desired(self, desired: pb.DesiredState) -> None:
        # Tracing on: the apply is a trace of its own, linked to the change's span.
        with apply_span(desired.trace_parent, self.node_id, desired.revision, desired.digest):
            await self._apply(desired)

    async def _apply(self, desired: pb.DesiredState) -> None:
        target = Target(
            digest=desired.digest,
            revision=desired.revision,
            # Taken literally: 0 is a blue-green standby's weight, not "unset" (the
            # control plane always sends an explicit weight).
            traffic_weight=desired.traffic_weight,
            assigned_revision=desired.assigned_revision,
            source=desired.source,
            size_bytes=desired.size_bytes,
            annotations=dict(desired.annotations),
            signature=desired.signature,
            key_id=desired.key_id,
        )
        log = self.log.bind(revision=target.revision, digest=target.digest or None)
        router = desired.router if desired.HasField("router") else None
        if not target.digest:
            if router is not None:
                log.warning(
                    "router.waiting",
                    routes=router.revision,
                    detail="a routing table but no bundle: the proxy runs nothing to route with",
                )
            else:
                log.info("desired.none", detail="nothing assigned; keeping the current bundle")
            self._advance(target.revision)
            return
        active = self.installer.active_digest()
        if target.digest == active:
            await self._unchanged(target, active, log, router)
            return
        failed = self.cursor.failed
        if failed is not None and failed.parks(
            target.digest, target.revision, target.assigned_revision, self.stream.epoch
        ):
            self.counters.parked += 1
            log.warning(
                "desired.parked", detail="this bundle was rejected before", failed_revision=failed.revision
            )
            self._advance(target.revision)
            # Said again: the agent may have stopped between recording the failure and
            # reporting it. A report the server already holds is a replay it ignores.
            await self.reporter.report(
                self.stream.stream_id, failed.revision, failed.digest, "FAILED", failed.error
            )
            return
        log.info("apply.start", source=target.source, weight=target.traffic_weight, previous=active or None)

        async def downloaded() -> None:
            log.info("apply.downloaded")
            await self.reporter.report(self.stream.stream_id, target.revision, target.digest, "DOWNLOADED")

        try:
            await self.installer.install(target, self.node_id, downloaded)
        except ApplyFailed as e:
            self.counters.failed += 1
            log.error("apply.failed", reason=e.reason, kept=active or None)
            failure = Failure(
                target.digest, target.revision, e.reason, target.assigned_revision, self.stream.epoch
            )
            self._persist(replace(self.cursor.advanced(target.revision, self.stream.epoch), failed=failure))
            await self.reporter.report(
                self.stream.stream_id, target.revision, target.digest, "FAILED", e.reason
            )
            return
        self.counters.applied += 1
        refused, applied_routes = await self._route(router, log)
        cursor = self.cursor.advanced(target.revision, self.stream.epoch)
        self._persist(
            replace(
                cursor,
                applied_digest=target.digest,
                applied_revision=target.revision,
                applied_weight=target.traffic_weight,
                applied_routes=applied_routes,
                previous_digest=active,
                failed=None,
            )
        )
        log.info("apply.active", previous=active or None)
        if refused:
            await self.reporter.report(
                self.stream.stream_id,
                target.revision,
                target.digest,
                "FAILED",
                f"the bundle is active; {refused}",
            )
            return
        await self.reporter.report(self.stream.stream_id, target.revision, target.digest, "ACTIVE")

    async def _unchanged(
        self, target: Target, active: str, log: EventLog, router: pb.RouterState | None
    ) -> None:
        """The node already runs this bundle: acknowledge it, after telling the proxy
        its new traffic weight if only that changed, and a router its routing table."""
        cursor = self.cursor.advanced(target.revision, self.stream.epoch)
        if target.traffic_weight != self.cursor.applied_weight:
            log.info("apply.reweight", weight=target.traffic_weight, previous=self.cursor.applied_weight)
            try:
                await self.installer.reweight(target, self.node_id)
            except ApplyFailed as e:
                self.counters.failed += 1
                log.error("apply.reweight_failed", reason=e.reason, weight=self.cursor.applied_weight)
                self._persist(cursor)
                reason = f"traffic weight {target.traffic_weight} refused: {e.reason}"
                await self.reporter.report(
                    self.stream.stream_id, target.revision, target.digest, "FAILED", reason
                )
                return
            cursor = replace(cursor, applied_weight=target.traffic_weight)
        elif router is None or router.revision == self.cursor.applied_routes:
            self.counters.unchanged += 1
            log.info("desired.unchanged", detail="already running this bundle")
        refused, applied_routes = await self._route(router, log)
        if cursor.failed is not None and cursor.failed.digest == target.digest:
            cursor = replace(cursor, failed=None)
        self._persist(replace(cursor, applied_digest=active, applied_routes=applied_routes))
        if refused:
            await self.reporter.report(
                self.stream.stream_id, target.revision, target.digest, "FAILED", refused
            )
            return
        await self.reporter.report(self.stream.stream_id, target.revision, target.digest, "ACTIVE")

    async def _route(self, router: pb.RouterState | None, log: EventLog) -> tuple[str, int]:
        """Apply a router's routing table unless it already runs it (or withdraw the one
        it runs when none is sent). Returns the refusal ("" for none) and the revision of
        the table now applied."""
        applied = self.cursor.applied_routes
        if router is None and not applied:
            return "", 0
        if router is not None and router.revision == applied:
            return "", applied
        route = getattr(self.installer, "route", None)
        try:
            table = (
                routes.table(
                    router.revision,
                    router.backend,
                    [(b.node_id, b.address, b.weight) for b in router.backends],
                )
                if router is not None
                else None
            )
            if route is None:
                if table is None:
                    return "", 0
                raise ApplyFailed("this agent's installer cannot route")
            await route(table)
        except ValueError as e:
            reason = f"routing table (revision {router.revision if router else 0}) refused: {e}"
        except ApplyFailed as e:
            reason = f"routing table (revision {router.revision if router else 0}) refused: {e.reason}"
        else:
            self.counters.routed += 1
            log.info(
                "router.routed",
                routes=router.revision if router else 0,
                backend=router.backend if router else None,
                servers=len(router.backends) if router else 0,
            )
            return "", router.revision if router is not None else 0
        self.counters.route_refused += 1
        log.error("router.refused", reason=reason)
        return reason, applied
