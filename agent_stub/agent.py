"""`Agent`: the watch loop, the heartbeat and the apply pipeline wired together.

Used by the command line, and in-process by simulators and tests: pass an existing
`grpc.aio.Channel` to share one connection between many agents, a `MemoryStateStore` to
keep nothing on disk, an `apply` hook (or a whole `installer`) to replace the apply
command, and `metrics` to feed heartbeats. Progress is visible through attributes
(`node_id`, `cursor`, `active_digest`, `counters`, `connected`) and through
`on_event(listener)`, which hears every event the agent logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from typing import Any

from agent_stub.applier import ApplyHook, Driver, FilesystemInstaller, HookDriver, Installer
from agent_stub.backoff import Backoff
from agent_stub.bundles import BundleStore
from agent_stub.config import AgentConfig
from agent_stub.download import Downloader, KeyLister
from agent_stub.drivers import build_driver
from agent_stub.events import Counters, EventHandler, StreamInfo
from agent_stub.heartbeat import Heartbeater, MetricsSource
from agent_stub.identity import Registrar
from agent_stub.logs import EventLog, Listener
from agent_stub.reporter import Reporter
from agent_stub.rpc import open_channel
from agent_stub.state import Cursor, FileStateStore, StateStore
from agent_stub.verify import BundleVerifier, KeyRing
from agent_stub.watcher import Watcher
from controlplane.api.node.v1 import node_pb2


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        channel: Any = None,
        state: StateStore | None = None,
        installer: Installer | None = None,
        apply: ApplyHook | None = None,
        metrics: MetricsSource | None = None,
        logger: logging.Logger | None = None,
        rng: Callable[[], float] = random.random,
    ):
        self.config = config
        self._owns_channel = channel is None
        self.channel = channel if channel is not None else open_channel(config.server, config.tls)
        if (state is None or installer is None) and config.state_dir is None:
            raise ValueError("a state_dir is needed unless both state and installer are given")
        self.log = EventLog(logger or logging.getLogger("agent_stub"), {"node": None})
        self.state: StateStore = state if state is not None else FileStateStore(self._dir(), config.fsync)
        self.registrar = Registrar(self.channel, config, self.state, self.log)
        if self.registrar.saved is not None:
            self.log.set(node=self.registrar.saved.node_id)
        self.bundles: BundleStore | None = None
        # The proxy's side of installs, health and metrics (agent_stub/drivers/).
        self.driver: Driver | None = None
        if installer is None:
            self.bundles = BundleStore(self._dir(), config.fsync)
            downloader = Downloader(
                self.channel,
                project=lambda: config.project,
                metadata=self.metadata,
                max_bytes=config.max_bundle_bytes,
                read_timeout=config.liveness_timeout,
                fsync=config.fsync,
            )
            self.driver = (
                HookDriver(apply)
                if apply is not None
                else build_driver(config, self._dir(), self.log, lambda: self.node_id)
            )
            installer = FilesystemInstaller(
                self.bundles,
                downloader,
                self.driver,
                config.unpack,
                config.fsync,
                self._verifier(config) if config.verify_bundles else None,
                log=self.log,
            )
        self.installer: Installer = installer
        self.reporter = Reporter(
            self.channel, lambda: self.node_id, self.metadata, self.log, timeout=config.rpc_timeout
        )
        self.handler = EventHandler(self.state, self.installer, self.reporter, self.log)
        self.backoff = Backoff(config.backoff, rng)
        self.watcher = Watcher(
            self.channel, self.registrar, self.handler, self.backoff, self.log, config.liveness_timeout
        )
        self.heartbeater = Heartbeater(
            self.channel,
            lambda: self.node_id,
            self.metadata,
            self.installer.active_digest,
            self.log,
            interval=config.heartbeat_interval,
            metrics_file=config.metrics_file,
            metrics=metrics if metrics is not None else self._driver_metrics,
            timeout=config.rpc_timeout,
        )
        self._stop = asyncio.Event()

    async def _driver_metrics(self) -> node_pb2.NodeMetrics | None:
        """What the proxy's own statistics say, for the bundle `current` names."""
        if self.driver is None:
            return None
        return await self.driver.metrics(self.installer.active_digest())

    def _verifier(self, config: AgentConfig) -> BundleVerifier:
        """Signature and manifest checks: against the keys file, or the keys pinned at
        first contact in the state dir, less the retirements recorded there (verify.py)."""
        ring = (
            KeyRing.from_file(config.trusted_keys, self._dir(), config.fsync)
            if config.trusted_keys is not None
            else KeyRing.pinned_in(self._dir(), config.fsync)
        )
        lister = KeyLister(self.channel, lambda: config.project, self.metadata, config.rpc_timeout)
        return BundleVerifier(ring, lister)

    def _dir(self) -> Any:
        assert self.config.state_dir is not None
        return self.config.state_dir

    # -- what a simulator or test looks at -------------------------------------------

    @property
    def node_id(self) -> str:
        identity = self.registrar.identity
        return identity.node_id if identity is not None else ""

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self.registrar.metadata()

    @property
    def cursor(self) -> Cursor:
        return self.handler.cursor

    @property
    def stream(self) -> StreamInfo:
        return self.handler.stream

    @property
    def active_digest(self) -> str:
        return self.installer.active_digest()

    @property
    def counters(self) -> Counters:
        return self.handler.counters

    @property
    def connected(self) -> asyncio.Event:
        """Set while a stream is delivering messages."""
        return self.watcher.connected

    def on_event(self, listener: Listener) -> None:
        self.log.listeners.append(listener)

    # -- lifecycle -------------------------------------------------------------------

    def _startup(self) -> None:
        cursor = self.handler.cursor
        active = self.installer.active_digest()
        if self.bundles is not None:
            # The cursor's applied bundle too: a crash between the swap and the cursor write
            # leaves it as the one to go back to if the proxy refuses `current`.
            removed = self.bundles.gc(keep={active, cursor.applied_digest, cursor.previous_digest})
            if removed:
                self.log.info("startup.cleaned", removed=len(removed))
        if cursor.applied_digest and active != cursor.applied_digest:
            # A crash between the swap and the cursor write: `current` is the truth.
            self.log.warning(
                "startup.current_differs", cursor_digest=cursor.applied_digest, current=active or None
            )
        self.log.info(
            "agent.start",
            server=self.config.server,
            project=self.config.project,
            revision=cursor.revision,
            epoch=cursor.epoch or None,
            current=active or None,
        )

    async def run(self) -> None:
        """Run until `stop()` (or cancellation). Errors talking to the server never end
        it; only a bug in the agent itself would."""
        self._startup()
        reconcile = getattr(self.installer, "reconcile", None)
        if reconcile is not None:
            # Before the first report or heartbeat: what the node says it runs is what
            # its proxy serves, whatever a crash left behind.
            await reconcile(self.handler.cursor.applied_digest)
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(self.watcher.run(), name="watch"),
            loop.create_task(self.heartbeater.run(self.watcher.registered), name="heartbeat"),
        ]
        stopper = loop.create_task(self._stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in (*tasks, stopper):
                task.cancel()
            await asyncio.gather(*tasks, stopper, return_exceptions=True)
            self.log.info("agent.stop", revision=self.handler.cursor.revision)
            if self.driver is not None:
                await self.driver.close()
            if self._owns_channel:
                with contextlib.suppress(Exception):
                    await self.channel.close()

    def stop(self) -> None:
        """Ask `run()` to return: the stream is cancelled, the apply command killed."""
        self._stop.set()
