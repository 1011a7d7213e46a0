"""The ADS servicer's feed on the watch hub: what an Envoy node should run, as it changes.

Each xDS stream opens a hub stream for its node, as WatchBundles does, so it follows
the same desired-state log with the same routing (the node's assignment, its project's
selectors, pins, revocation) and the same bounded per-stream queue. The hub writes
pre-encoded WatchBundles events into `HubFeed.write`; the feed keeps only the newest
desired state (a bounded queue of one: an Envoy between two revisions only ever needs
the last) and resolves it, when the session asks, to a `Snapshot`: the bundle's parsed
resources, cached by digest and shared by every stream (`BundleResources`).

Statuses go back through the node registry's status path, under the hub stream's id
(its ledger says what it sent): ACTIVE when every type of a revision is acknowledged,
FAILED with Envoy's error on a NACK. Rollouts, gates, drift and the audit trail read
them as they read an agent's reports.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from controlplane.api.watch.v1 import watch_pb2 as pb
from controlplane.domain.bundles.archive.limits import InvalidArchive
from controlplane.domain.bundles.archive.manifest import MANIFEST_PATH, Manifest
from controlplane.domain.bundles.archive.read import read_members
from controlplane.domain.bundles.registry import BundleRegistry
from controlplane.domain.fleet.nodes import NodeRegistry
from controlplane.domain.kernel.errors import DomainError, FailedPrecondition, Unavailable
from controlplane.domain.model.bundles import BundleState
from controlplane.domain.model.fleet import Node, NodeMetrics, ReportPhase, XdsRecord
from controlplane.rpc import xds as rpc_xds
from controlplane.watch.hub import WatchHub
from controlplane.watch.stream import WatchStream
from controlplane.xds import resources, snapshot
from controlplane.xds.pipeline import VALIDATOR
from controlplane.xds.session import Session
from controlplane.xds.snapshot import EMPTY, ResourceSet, Snapshot
from controlplane.xds.status import NodeXdsStatus, Phase

log = logging.getLogger(__name__)

# How long an opening stream waits for this process's hub to know its node.
VISIBILITY_TIMEOUT = 3.0
# Parsed bundles kept: a fleet runs a handful of bundles at once (old, new, a canary).
CACHED_BUNDLES = 32
MAX_MANIFEST_BYTES = 64 * 1024 * 1024


class BundleResources:
    """The parsed resources of xDS bundles by digest, read once per process."""

    def __init__(self, bundles: BundleRegistry, scratch: Path, keep: int = CACHED_BUNDLES):
        self._bundles = bundles
        self._scratch = scratch
        self._keep = keep
        self._cache: collections.OrderedDict[str, asyncio.Future[ResourceSet]] = collections.OrderedDict()
        self.loads = 0

    async def get(self, project: str, digest: str) -> ResourceSet:
        if not digest:
            return EMPTY
        load = self._cache.get(digest)
        if load is None:
            # A task of its own: a stream that goes away while it waits does not cancel
            # the read the others wait for.
            load = self._cache[digest] = asyncio.ensure_future(self._load(project, digest))
            load.add_done_callback(lambda done: self._forget_failed(digest, done))
            while len(self._cache) > self._keep:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(digest)
            if load.done() and not load.cancelled() and load.exception() is None:
                return load.result()  # the usual case: no shield to build per stream
        return await asyncio.shield(load)

    def _forget_failed(self, digest: str, load: asyncio.Future[ResourceSet]) -> None:
        """Failures are not cached: the next stream tries again."""
        if (load.cancelled() or load.exception() is not None) and self._cache.get(digest) is load:
            del self._cache[digest]

    async def compare(self, project: str, from_digest: str, to_digest: str) -> snapshot.ResourceDiff | None:
        """The resources added, removed and changed from one bundle to the other, when
        both passed the xDS checks at push; None otherwise (`bundle compare`)."""
        sets = []
        for digest in (from_digest, to_digest):
            bundle = await self._bundles.get(project, digest)
            if not any(r.validator == VALIDATOR and r.ok for r in bundle.validation):
                return None
            # Only bundles nodes may run go through the cache the streams read.
            if bundle.state is BundleState.VALID:
                sets.append(await self.get(project, digest))
            else:
                sets.append(await self._load(project, digest, for_node=False))
        return snapshot.diff(sets[0], sets[1])

    async def _load(self, project: str, digest: str, for_node: bool = True) -> ResourceSet:
        self.loads += 1
        self._scratch.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="xds-", dir=self._scratch))
        try:
            archive = work / "bundle.tar.zst"
            _, chunks = await self._bundles.open(project, digest, for_node=for_node)
            with archive.open("wb") as out:
                async for chunk in chunks:
                    out.write(chunk)
            loaded = await asyncio.to_thread(_parse, archive, work / "tree")
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
        if not loaded.ok:
            raise FailedPrecondition(
                f"bundle {digest} holds no valid Envoy resources: {loaded.errors[0][:500]}", field="digest"
            )
        if not loaded.resources.count():
            # Another proxy's bundle, most likely: running it would remove everything.
            raise FailedPrecondition(
                f"bundle {digest} holds no valid Envoy resources: no .yaml, .yml or .json file "
                "holds one (an xDS node runs only xDS bundles)",
                field="digest",
            )
        return loaded.resources


def _parse(archive: Path, root: Path) -> resources.Loaded:
    """The resource files of a stored bundle, written out under `root`, then loaded."""
    try:
        manifest = read_members(archive, [MANIFEST_PATH], MAX_MANIFEST_BYTES).get(MANIFEST_PATH)
        if manifest is None:
            raise InvalidArchive("it has no manifest")
        paths = [
            e.path
            for e in Manifest.from_bytes(manifest).files
            if os.path.splitext(e.path)[1].lower() in resources.EXTENSIONS
        ]
        for path, body in read_members(archive, paths, resources.MAX_TYPE_BYTES * 4).items():
            target = (root / path).resolve()
            if body is None or not target.is_relative_to(root.resolve()):
                raise InvalidArchive(f"member {path[:80]!r} is too large or outside the bundle")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(body)
    except (InvalidArchive, OSError, ValueError) as e:
        return resources.Loaded(EMPTY, (f"the stored archive is unreadable: {e}",))
    return resources.load(root, paths)


class HubFeed:
    """One ADS stream's view of its node on the hub (a `rpc_xds.Feed`)."""

    # One per open stream: no instance dict.
    __slots__ = (
        "_feeds", "_latest", "_reported", "_waiter", "base", "node_id", "project", "stream", "target",
    )  # fmt: skip

    def __init__(
        self,
        feeds: HubFeeds,
        node_id: str,
        project: str,
        base: Snapshot | None,
        reported: tuple[int, str, Phase] | None = None,
    ):
        self._feeds = feeds
        self.node_id = node_id
        self.project = project
        self.base = base
        self.target = Snapshot(0, "", EMPTY)
        self.stream: WatchStream | None = None
        # The newest desired state not yet taken: (revision, digest).
        self._latest: tuple[int, str] | None = None
        # What `next` (or `first`) waits on, while it waits: woken by a new desired state
        # or the hub stream's end. A plain future, not a task per wait: an idle Envoy
        # stream holds nothing else here.
        self._waiter: asyncio.Future[None] | None = None
        # The last outcome reported (or found recorded when the stream opened): reporting
        # it again would be a replay the registry ignores.
        self._reported = reported

    # -- the hub's side: a Sink ------------------------------------------------------

    async def write(self, payload: bytes) -> None:
        for event in pb.WatchBundlesResponse.FromString(payload).events:
            if event.WhichOneof("event") == "desired":
                self._latest = (event.desired.revision, event.desired.digest)
                self._wake()

    def _wake(self, _: object = None) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        """Until a new desired state arrives or the hub stream ends."""
        stream = self.stream
        assert stream is not None
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        stream.done.add_done_callback(self._wake)
        try:
            await waiter
        finally:
            self._waiter = None
            stream.done.remove_done_callback(self._wake)

    # -- the session's side ------------------------------------------------------------

    async def first(self) -> None:
        """Resolve the desired state the hub queued when the stream opened."""
        while self._latest is None:
            assert self.stream is not None
            if self.stream.done.done():
                break
            await self._wait()
        result = await self.next()
        if not isinstance(result, Snapshot):
            raise result or Unavailable("the stream ended as it opened; reconnect")
        self.target = result

    async def next(self) -> Snapshot | DomainError | None:
        stream = self.stream
        assert stream is not None
        while True:
            if self._latest is not None:
                revision, digest = self._latest
                self._latest = None
                try:
                    found = await self._feeds.resources.get(self.project, digest)
                except DomainError as e:
                    await self._refuse(revision, digest, e)
                    continue
                return Snapshot(revision, digest, found)
            if not stream.done.done():
                await self._wait()
            if stream.done.done() and self._latest is None:
                end = stream.done.result()
                return end if end is not None else Unavailable("the server closed this stream; reconnect")

    async def _refuse(self, revision: int, digest: str, error: DomainError) -> None:
        """A bundle this node cannot run over xDS: FAILED, as an agent reports it."""
        log.warning("xDS node %s cannot run bundle %s: %s", self.node_id, digest, error)
        await self._report(revision, digest, ReportPhase.FAILED, str(error))

    async def report(self, status: NodeXdsStatus) -> None:
        if status.phase is Phase.PENDING or not status.digest:
            return  # the registry hears of outcomes only (and of bundles, not of "nothing")
        # What Envoy acknowledged is kept with the report, for every replica to show.
        if status.phase is Phase.ACTIVE:
            await self._report(status.revision, status.digest, ReportPhase.ACTIVE, "", status.record())
        else:
            await self._report(
                status.revision, status.digest, ReportPhase.FAILED, status.error, status.record()
            )

    async def _report(
        self, revision: int, digest: str, phase: ReportPhase, error: str, xds: XdsRecord | None = None
    ) -> None:
        key = (revision, digest, Phase.ACTIVE if phase is ReportPhase.ACTIVE else Phase.FAILED)
        if key == self._reported or self.stream is None:
            return
        try:
            await self._feeds.nodes.report_status(
                self.node_id, self.stream.stream_id, revision, digest, phase, error[:4000], xds
            )
            self._reported = key
        except DomainError as e:
            # A report the registry refuses (stale: another stream of this node moved it on)
            # changes nothing here; the stream goes on.
            log.info("xDS status of node %s not recorded: %s", self.node_id, e)

    def close(self) -> None:
        if self.stream is not None:
            self._feeds.hub.close(self.stream)
            self.stream = None
        self._feeds.opened.discard(self)


class HubFeeds:
    """`rpc_xds.Feeds` on the watch hub, with statuses and heartbeats into the registry."""

    def __init__(self, hub: WatchHub, nodes: NodeRegistry, bundles: BundleRegistry, scratch: Path):
        self.hub = hub
        self.nodes = nodes
        self.resources = BundleResources(bundles, scratch)
        self.opened: set[HubFeed] = set()
        # The servicer's open sessions by node (what each Envoy runs whole).
        self.sessions: Mapping[str, Session] = {}

    async def open(self, node_id: str, node: Node | None = None) -> HubFeed:
        """`node`: the node's record as the stream's authentication read it (a credential
        or certificate check), else read here. What the feed takes from it, the node's
        project and the bundle it last ran, is the same either way."""
        hub = self.hub
        hub.check_accepting()
        if not hub.knows_node(node_id) and not await hub.wait_until(node_id, 0, VISIBILITY_TIMEOUT):
            raise Unavailable("this server does not know this node yet; retry", retry_after_ms=1000)
        if node is None:
            node = await self.nodes.get(node_id)
        base = None
        if node.applied_digest:
            with contextlib.suppress(DomainError):
                found = await self.resources.get(node.project, node.applied_digest)
                base = Snapshot(node.applied_revision, node.applied_digest, found)
        # A node that reconnects acknowledges what it already reported: no report then.
        feed = HubFeed(self, node_id, node.project, base, _recorded(node))
        feed.stream = hub.open(node_id, 0, hub.epoch, feed)
        self.opened.add(feed)
        try:
            await feed.first()
        except BaseException:
            feed.close()
            raise
        return feed

    def status_of(self, node_id: str) -> NodeXdsStatus | None:
        """What the node's open stream on this server says it acknowledged, if it has one."""
        session = self.sessions.get(node_id)
        return session.status if session is not None else None

    async def heartbeat(self, node_id: str, metrics: NodeMetrics) -> None:
        """A stats flush of Envoy's: the node's heartbeat, with what it runs whole."""
        session = self.sessions.get(node_id)
        running = session.base.bundle_digest if session is not None else ""
        await self.nodes.heartbeat(node_id, metrics, running)


def _recorded(node: Node) -> tuple[int, str, Phase] | None:
    """The outcome the node's last recorded report holds, as a feed reports it. The
    same report again is a replay (nothing recorded, nobody told), or stale if another
    stream moved the node on since it was read: a no-op either way."""
    last = node.last_report
    if last is None or last.phase is ReportPhase.DOWNLOADED:
        return None
    return last.revision, last.digest, Phase.ACTIVE if last.phase is ReportPhase.ACTIVE else Phase.FAILED


def servicers(feeds: HubFeeds) -> tuple[rpc_xds.AdsServicer, rpc_xds.MetricsServicer]:
    ads = rpc_xds.AdsServicer(feeds)
    feeds.sessions = ads.sessions
    return ads, rpc_xds.MetricsServicer(feeds.heartbeat)
