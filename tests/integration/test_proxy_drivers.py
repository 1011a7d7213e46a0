"""The nginx, HAProxy and Envoy drivers in the agent's installer, against the real
binaries: a bundle goes live only once the proxy serves it, a bundle the proxy refuses
changes nothing, one it cannot run is reverted, and the proxy's own statistics become
heartbeat metrics. No control plane here: bundles come from memory (the e2e tests run the
same drivers in agent processes against a real server)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent_stub.applier import HOLD_AFTER_SWAP, FilesystemInstaller, Target
from agent_stub.bundles import BundleStore
from agent_stub.config import ProxyConfig
from agent_stub.drivers import DRIVERS
from agent_stub.drivers.base import ProxyDriver
from agent_stub.drivers.haproxy import HaproxyDriver
from agent_stub.errors import ApplyFailed
from agent_stub.logs import EventLog
from controlplane.api.node.v1 import node_pb2
from controlplane.proxies import ProxyKind, haproxy, nginx
from tests.support.archives import bundle
from tests.support.eventually import eventually
from tests.support.ports import unused_port
from tests.support.proxies import (
    KINDS,
    RequestLoop,
    Upstream,
    binary,
    kill_proxy,
    main_pid,
    port_taken,
    proxy_files,
    proxy_reloads,
    proxy_roots,
    refused_files,
    served_digest,
    stop_proxies,
    unbindable_files,
    upstreams,
)

each_proxy = pytest.mark.parametrize("kind", KINDS)


class Blobs:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def add(self, files: dict[str, bytes]) -> str:
        data = bundle(files)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return digest

    async def __call__(self, digest: str, dest: Path) -> int:
        return _write(dest, self.blobs[digest])


def _write(path: Path, data: bytes) -> int:
    return path.write_bytes(data)


async def nothing() -> None:
    return None


@dataclass
class Node:
    kind: ProxyKind
    state: Path
    status: int
    port: int
    ups: dict[str, Upstream]
    driver: ProxyDriver
    installer: FilesystemInstaller
    blobs: Blobs
    events: list[tuple[str, dict[str, object]]]
    revision: int = 0
    # Drivers a test built as a restarted agent would: closed by the fixture too, so a
    # test that fails half-way leaves no proxy process unreaped for a later test's GC.
    spares: list[ProxyDriver] = field(default_factory=list)

    def files(self, upstream: str) -> dict[str, bytes]:
        return proxy_files(self.kind, self.port, self.ups[upstream].port)

    async def install(self, files: dict[str, bytes]) -> str:
        digest = self.blobs.add(files)
        self.revision += 1
        await self.installer.install(Target(digest, self.revision), "n-test", nothing)
        return digest

    async def served(self) -> str:
        return await served_digest(self.kind, self.status)

    async def bodies(self, count: int = 20) -> set[str]:
        loop = RequestLoop(self.port, pause=0.0, limit=count).start()
        await loop.wait_for(count)
        await loop.stop()
        return set(loop.since(0))

    async def settles_on(self, body: str, digest: str) -> None:
        """The proxy says it serves `digest` and only `body` is served, once the replaced
        processes are gone. A reloaded HAProxy's old worker can still take a connection
        in the moments before it closes its listeners; an Envoy whose new process died
        starting is put back as a new process family and the old one is stopped, and
        requests on the old family's sockets in those moments can be reset (a known
        weakness of the Envoy driver's revert, agent_stub/drivers/envoy.py)."""

        async def only() -> None:
            assert await self.served() == digest
            assert await self.bodies() == {body}

        await eventually(only, timeout=10, what=f"only {body} served")

    def fresh_driver(self) -> ProxyDriver:
        """What a restarted agent builds: a driver that never started this proxy."""
        spare = make_driver(self.kind, self.state, self.status, EventLog(logging.getLogger("test"), {}))
        self.spares.append(spare)
        return spare


def make_driver(kind: ProxyKind, state: Path, status: int, log: EventLog, **settings: Any) -> ProxyDriver:
    config = ProxyConfig(
        kind=kind, status=f"127.0.0.1:{status}", confirm_timeout=15, drain_seconds=1, **settings
    )
    return DRIVERS[kind](binary(kind), config, state, log, validate_timeout=30, node_id=lambda: "n-test")


@pytest.fixture
def settings() -> dict[str, Any]:
    return {}


@pytest.fixture
async def node(kind: ProxyKind, tmp_path: Path, settings: dict[str, Any]) -> AsyncIterator[Node]:
    state = tmp_path / "state"
    events: list[tuple[str, dict[str, object]]] = []
    log = EventLog(logging.getLogger("test"), {}, [lambda name, fields: events.append((name, dict(fields)))])
    status = unused_port()
    driver = make_driver(kind, state, status, log, **settings)
    store = BundleStore(state, fsync=False)
    blobs = Blobs()
    installer = FilesystemInstaller(store, blobs, driver, fsync=False, log=log)
    with upstreams() as ups:
        node = Node(kind, state, status, unused_port(), ups, driver, installer, blobs, events)
        try:
            yield node
        finally:
            stop_proxies(state)
            for started in (driver, *node.spares):
                await started.close()  # after the stop: it reaps the proxies it started


def reloads(node: Node) -> int:
    return proxy_reloads(node.kind, node.state)


@each_proxy
async def test_a_bundle_goes_live_only_when_the_proxy_serves_it(node: Node) -> None:
    v1 = await node.install(node.files("v1"))
    assert await node.served() == v1
    assert await node.bodies() == {"v1"}
    first = main_pid(node.kind, node.state)

    v2 = await node.install(node.files("v2"))
    assert node.installer.active_digest() == v2
    assert await node.served() == v2
    assert await node.bodies() == {"v2"}
    started = [name for name, _ in node.events].count("proxy.started")
    if node.kind == "envoy":  # a hot restart: a new process took over from the first
        assert main_pid(node.kind, node.state) != first and started == 2
    else:  # nginx and HAProxy reload in place
        assert main_pid(node.kind, node.state) == first and started == 1


@each_proxy
async def test_a_bundle_the_proxy_refuses_changes_nothing(node: Node) -> None:
    v1 = await node.install(node.files("v1"))
    before = reloads(node)
    files, phrase = refused_files(node.kind, node.port, node.ups["v2"].port)
    with pytest.raises(ApplyFailed) as refused:
        await node.install(files)
    reason = refused.value.reason
    assert phrase in reason and f"{node.kind} {binary(node.kind).version} refused" in reason, reason
    assert str(node.state) not in reason, "tree paths are shown relative to the bundle"
    assert reloads(node) == before, "the proxy was not touched"
    assert node.installer.active_digest() == v1 and await node.served() == v1
    assert await node.bodies() == {"v1"}

    with pytest.raises(ApplyFailed) as missing:
        await node.install({"README": b"no main configuration here\n"})
    main = {"nginx": "nginx.conf", "haproxy": "haproxy.cfg", "envoy": "envoy.yaml"}[node.kind]
    assert f"the bundle has no {main}" in missing.value.reason and "README" in missing.value.reason
    assert await node.served() == v1


@each_proxy
async def test_a_bundle_the_proxy_cannot_run_is_reverted(node: Node) -> None:
    v1 = await node.install(node.files("v1"))
    with port_taken() as taken:
        bad_files = unbindable_files(node.kind, node.port, node.ups["v2"].port, taken)
        with pytest.raises(ApplyFailed) as failed:
            await node.install(bad_files)
    reason = failed.value.reason
    assert "in use" in reason and f"the node is back on {v1}" in reason, reason
    assert node.installer.active_digest() == v1
    await node.settles_on("v1", v1)
    assert any(name == "apply.reverted" for name, _ in node.events)


@each_proxy
async def test_a_first_bundle_the_proxy_cannot_run_leaves_nothing(node: Node) -> None:
    with port_taken() as taken, pytest.raises(ApplyFailed) as failed:
        await node.install(unbindable_files(node.kind, node.port, node.ups["v1"].port, taken))
    assert "in use" in failed.value.reason, failed.value.reason
    assert node.installer.active_digest() == "" and not (node.state / "current").exists()
    v1 = await node.install(node.files("v1"))
    assert await node.served() == v1


@each_proxy
async def test_metrics_come_from_the_proxy(node: Node) -> None:
    v1 = await node.install(node.files("v1"))
    assert (await node.driver.metrics("")) is None, "no bundle, nothing to say"
    first = await node.driver.metrics(v1)
    assert first is not None and first.health == node_pb2.HEALTH_STATUS_HEALTHY
    assert not first.HasField("requests_per_second"), "no window before the second reading"
    assert await node.bodies(40) == {"v1"}
    node.ups["v1"].set_failing(True)
    assert await node.bodies(10) == {"HTTP 503"}

    async def counted() -> node_pb2.NodeMetrics:
        m = await node.driver.metrics(v1)
        assert m is not None and m.HasField("requests_per_second") and m.requests_per_second > 0, m
        return m

    metrics = await eventually(counted, timeout=10, what="a request rate")
    assert metrics.health == node_pb2.HEALTH_STATUS_HEALTHY
    assert 0.15 < metrics.error_rate < 0.25, metrics  # 10 of 50 answered 503
    if node.kind == "haproxy":
        assert not metrics.HasField("p99_latency_ms"), "HAProxy 2.6 reports no percentile"
    elif node.kind == "nginx":
        assert metrics.HasField("p99_latency_ms") and 0 <= metrics.p99_latency_ms < 1000
    else:
        # Envoy's histograms move at its stats flush, every 5 s.
        async def p99() -> None:
            m = await node.driver.metrics(v1)
            assert m is not None and m.HasField("p99_latency_ms") and 0 <= m.p99_latency_ms < 1000, m

        await eventually(p99, timeout=12, interval=0.5, what="a p99 from the flushed histogram")
    quiet = await node.driver.metrics(v1)
    assert quiet is not None and quiet.error_rate == 0 and quiet.requests_per_second < 5

    # Healthy means serving the applied bundle: asked about another, the node is not.
    other = await node.driver.metrics("sha256:" + "0" * 64)
    assert other is not None and other.health == node_pb2.HEALTH_STATUS_UNHEALTHY

    kill_proxy(node.kind, node.state)

    async def down() -> None:
        m = await node.driver.metrics(v1)
        assert m is not None and m.health == node_pb2.HEALTH_STATUS_UNHEALTHY, m

    await eventually(down, timeout=10, what="unhealthy once the proxy is gone")


@each_proxy
async def test_a_restarted_agent_finds_its_proxy_and_reconciles_it(node: Node) -> None:
    v1 = await node.install(node.files("v1"))
    pid = main_pid(node.kind, node.state)
    driver = node.fresh_driver()
    store = node.installer.store
    again = FilesystemInstaller(store, node.blobs, driver, fsync=False)
    await again.reconcile(v1)
    assert main_pid(node.kind, node.state) == pid, "the running proxy was found, not started twice"
    assert await node.served() == v1

    # A crash between the swap and the reload: `current` names v2, the proxy serves v1.
    v2_files = node.files("v2")
    v2 = node.blobs.add(v2_files)
    staging = store.new_staging(v2)
    for name, data in v2_files.items():
        (staging / name).write_bytes(data)
    store.commit(staging, v2)
    store.swap(v2)
    assert await node.served() == v1
    await again.reconcile(v1)
    await node.settles_on("v2", v2)

    await driver.close()

    # The proxy is gone: a restarted agent starts it again from `current`.
    stop_proxies(node.state)
    third = node.fresh_driver()
    try:
        await FilesystemInstaller(store, node.blobs, third, fsync=False).reconcile(v1)
        await node.settles_on("v2", v2)
    finally:
        await third.close()


@pytest.mark.parametrize("kind", ["haproxy"])
async def test_a_master_slow_to_answer_is_waited_for_not_started_twice(node: Node) -> None:
    """A restarted agent whose HAProxy master does not answer its CLI at once (a loaded
    machine; here: stopped for 6 s) waits for it. Starting a second HAProxy beside it
    would serve the old bundle and the new one side by side, for good."""
    v1 = await node.install(node.files("v1"))
    pid = main_pid(node.kind, node.state)
    os.kill(pid, signal.SIGSTOP)
    resume = asyncio.get_running_loop().call_later(6.0, os.kill, pid, signal.SIGCONT)
    try:
        await FilesystemInstaller(
            node.installer.store, node.blobs, node.fresh_driver(), fsync=False
        ).reconcile(v1)
    finally:
        resume.cancel()
        os.kill(pid, signal.SIGCONT)
    assert proxy_roots(node.state) == [pid], "one HAProxy, the first"
    await node.settles_on("v1", v1)


@each_proxy
async def test_a_crash_left_a_bundle_the_proxy_cannot_run_so_it_goes_back(node: Node) -> None:
    v1 = await node.install(node.files("v1"))
    store = node.installer.store
    with port_taken() as taken:
        bad_files = unbindable_files(node.kind, node.port, node.ups["v2"].port, taken)
        bad = node.blobs.add(bad_files)
        staging = store.new_staging(bad)
        for name, data in bad_files.items():
            (staging / name).write_bytes(data)
        store.commit(staging, bad)
        store.swap(bad)
        driver = node.fresh_driver()
        try:
            await FilesystemInstaller(store, node.blobs, driver, fsync=False).reconcile(v1)
        finally:
            await driver.close()
    assert store.active_digest() == v1
    await node.settles_on("v1", v1)


@each_proxy
async def test_held_between_the_swap_and_the_reload_the_node_says_what_its_proxy_serves(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = await node.install(node.files("v1"))
    hold = tmp_path / "go-on"
    monkeypatch.setenv(HOLD_AFTER_SWAP, str(hold))
    files = node.files("v2")
    v2 = node.blobs.add(files)
    task = asyncio.get_running_loop().create_task(node.installer.install(Target(v2, 9), "n-test", nothing))

    async def held() -> None:
        assert any(name == "fault.hold" for name, _ in node.events), "not at the hold yet"

    await eventually(held, timeout=30)
    assert node.installer.store.active_digest() == v2, "current is swapped"
    assert await node.served() == v1 and node.installer.active_digest() == v1, "but the proxy serves v1"
    hold.touch()
    await task
    assert await node.served() == v2 and node.installer.active_digest() == v2


ATTACHED_LOG = "service-manager.log"


def start_service(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.parametrize("kind", ["nginx", "haproxy"])  # Envoy runs under the agent only
@pytest.mark.parametrize("settings", [{"run": "attach"}])
async def test_an_attached_proxy_is_signalled_never_started(node: Node, tmp_path: Path) -> None:
    """A service manager runs the proxy with the command docs/agent.md gives, once
    `current` exists; the agent only signals it (pid file, master socket)."""
    service_log = node.state / "proxy" / ATTACHED_LOG
    if isinstance(node.driver, HaproxyDriver):
        node.driver.words_path = service_log  # what --proxy-log names

    async def service_manager() -> subprocess.Popen[bytes]:
        async def current() -> None:
            assert (node.state / "current").exists(), "no bundle yet: the unit waits"

        await eventually(current, timeout=30)
        run = node.state.absolute() / "proxy"
        argv = (
            nginx.run_argv(binary("nginx"), node.state.absolute() / "current" / nginx.AGENT_MAIN, run)
            if node.kind == "nginx"
            else haproxy.run_argv(binary("haproxy"), node.state.absolute() / "current", run)
        )
        return start_service(argv, service_log)

    manager = asyncio.get_running_loop().create_task(service_manager())
    proc: subprocess.Popen[bytes] | None = None
    try:
        v1 = await node.install(node.files("v1"))
        proc = await manager
        assert await node.served() == v1 and await node.bodies() == {"v1"}
        v2 = await node.install(node.files("v2"))
        assert await node.served() == v2 and await node.bodies() == {"v2"}
        assert proc.poll() is None and main_pid(node.kind, node.state) == proc.pid, "reloaded, not restarted"
        with port_taken() as taken, pytest.raises(ApplyFailed) as failed:
            await node.install(unbindable_files(node.kind, node.port, node.ups["v1"].port, taken))
        assert "in use" in failed.value.reason and f"back on {v2}" in failed.value.reason, failed.value.reason
        assert await node.served() == v2
        assert not [name for name, _ in node.events if name == "proxy.started"], "the agent started nothing"
    finally:
        manager.cancel()
        if proc is not None:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 10)
