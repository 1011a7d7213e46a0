"""The HAProxy driver as a router, against the real binary: a routing table's servers go
into the bundle's backend through the runtime API at their weights, follow a new table
(weights, a backend gone, a new address), survive a reload of the router's own bundle
and a restart of HAProxy, and a table HAProxy cannot take is refused in its own words.
No control plane here (tests/e2e/test_routers.py runs the agents against a server)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent_stub.applier import FilesystemInstaller, Target
from agent_stub.bundles import BundleStore
from agent_stub.config import ProxyConfig
from agent_stub.drivers.haproxy import HaproxyDriver
from agent_stub.drivers.nginx import NginxDriver
from agent_stub.errors import ApplyFailed
from agent_stub.logs import EventLog
from controlplane.proxies import haproxy, haproxy_routes, routes
from tests.support.archives import bundle
from tests.support.ports import unused_port
from tests.support.proxies import RequestLoop, Upstream, binary, kill_proxy, stop_proxies, upstreams

ROUTER = """defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s

frontend web
    bind 127.0.0.1:{port}
    default_backend app

backend app
    balance roundrobin
{extra}"""


@dataclass
class Router:
    state: Path
    port: int
    status: int
    driver: HaproxyDriver
    installer: FilesystemInstaller
    blobs: dict[str, bytes]
    ups: dict[str, Upstream]
    revision: int = 0

    async def install(self, extra: str = "") -> str:
        data = bundle({haproxy.MAIN: ROUTER.format(port=self.port, extra=extra).encode()})
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        self.revision += 1

        async def nothing() -> None:
            return None

        await self.installer.install(Target(digest, self.revision), "n-router", nothing)
        return digest

    def table(self, weights: dict[str, int], backend: str = "app") -> routes.Table:
        self.revision += 1
        return routes.table(
            self.revision,
            backend,
            [(name, f"127.0.0.1:{self.ups[name].port}", w) for name, w in sorted(weights.items())],
        )

    async def servers(self, backend: str = "app") -> dict[str, int]:
        text = await haproxy.cli(self.driver.stats_socket, f"show servers state {backend}")
        running, maint = haproxy_routes.parse_servers_state(text, backend)
        assert not maint, f"servers left in maintenance: {maint}"
        return {name: s.weight for name, s in running.items()}

    async def bodies(self, count: int) -> dict[str, int]:
        loop = RequestLoop(self.port, pause=0.0, limit=count).start()
        await loop.wait_for(count, timeout=30)
        await loop.stop()
        return dict(loop.counts())


def driver(state: Path, status: int, log: EventLog) -> HaproxyDriver:
    config = ProxyConfig(kind="haproxy", status=f"127.0.0.1:{status}", confirm_timeout=15)
    return HaproxyDriver(
        binary("haproxy"), config, state, log, validate_timeout=30, node_id=lambda: "n-router"
    )


@pytest.fixture
async def router(tmp_path: Path) -> AsyncIterator[Router]:
    state = tmp_path / "state"
    log = EventLog(logging.getLogger("test"), {})
    status = unused_port()
    drv = driver(state, status, log)
    blobs: dict[str, bytes] = {}

    async def fetch(digest: str, dest: Path) -> int:
        return _write(dest, blobs[digest])

    installer = FilesystemInstaller(BundleStore(state, fsync=False), fetch, drv, fsync=False, log=log)
    with upstreams() as ups:
        try:
            yield Router(state, unused_port(), status, drv, installer, blobs, ups)
        finally:
            stop_proxies(state)
            await drv.close()


async def test_a_table_puts_its_servers_at_their_weights(router: Router) -> None:
    await router.install()
    await router.driver.route(router.table({"v1": 256, "v2": 0}))
    assert await router.servers() == {"cp-v1": 256, "cp-v2": 0}
    assert await router.bodies(50) == {"v1": 50}, "weight 0 takes no request"

    await router.driver.route(router.table({"v1": 128, "v2": 128}))
    assert await router.servers() == {"cp-v1": 128, "cp-v2": 128}
    split = await router.bodies(200)
    assert split.keys() == {"v1", "v2"} and abs(split["v1"] - split["v2"]) <= 20, split

    # A backend that left the selector is deleted; one that moved is set to its address.
    moved = Upstream("v1").start()
    try:
        router.revision += 1
        table = routes.table(router.revision, "app", [("v2", f"127.0.0.1:{moved.port}", 64)])
        await router.driver.route(table)
        assert await router.servers() == {"cp-v2": 64}
        assert await router.bodies(20) == {"v1": 20}, "v2's server now points at the moved upstream"
    finally:
        moved.stop()


async def test_the_routers_own_servers_are_left_alone(router: Router) -> None:
    await router.install(extra=f"    server static 127.0.0.1:{router.ups['v1'].port} weight 10\n")
    await router.driver.route(router.table({"v2": 256}))
    assert await router.servers() == {"static": 10, "cp-v2": 256}
    await router.driver.route(None)
    assert await router.servers() == {"static": 10}, "withdrawn: only the driver's servers go"


async def test_routed_servers_survive_a_reload_and_a_restart(router: Router) -> None:
    await router.install()
    await router.driver.route(router.table({"v1": 256, "v2": 256}))
    # The router's own bundle changes: HAProxy reloads, and the new worker gets the
    # routed servers again before the driver confirms.
    await router.install(extra="    option forwardfor\n")
    assert await router.servers() == {"cp-v1": 256, "cp-v2": 256}
    assert set(await router.bodies(40)) == {"v1", "v2"}
    # HAProxy dies; a restarted agent's driver brings it back with the table it kept.
    kill_proxy("haproxy", router.state)
    fresh = driver(router.state, router.status, EventLog(logging.getLogger("test"), {}))
    try:
        store = router.installer.store
        await FilesystemInstaller(store, _no_fetch, fresh, fsync=False).reconcile(store.active_digest())
        assert await router.servers() == {"cp-v1": 256, "cp-v2": 256}
        assert set(await router.bodies(40)) == {"v1", "v2"}
    finally:
        await fresh.close()


async def test_a_table_haproxy_cannot_take_is_refused_in_its_words(router: Router, tmp_path: Path) -> None:
    await router.install()
    with pytest.raises(ApplyFailed) as missing:
        await router.driver.route(router.table({"v1": 256}, backend="nope"))
    assert "haproxy has no backend 'nope'" in missing.value.reason, missing.value.reason
    # The router's next bundle must keep the backend its table names.
    await router.driver.route(router.table({"v1": 256}))
    with pytest.raises(ApplyFailed) as reloaded:
        await _install_without_backend(router)
    assert "haproxy has no backend 'app'" in reloaded.value.reason, reloaded.value.reason
    assert await router.servers() == {"cp-v1": 256}, "reverted: the previous bundle routes on"

    # A driver whose proxy cannot route says so.
    nginx = NginxDriver(
        binary("nginx"),
        ProxyConfig(kind="nginx", status=f"127.0.0.1:{unused_port()}"),
        tmp_path / "nginx",
        EventLog(logging.getLogger("test"), {}),
    )
    with pytest.raises(ApplyFailed) as cannot:
        await nginx.route(router.table({"v1": 256}))
    assert "cannot route" in cannot.value.reason and "--proxy haproxy" in cannot.value.reason
    await nginx.route(None)  # nothing to withdraw: fine


async def _install_without_backend(router: Router) -> str:
    text = ROUTER.format(port=router.port, extra="").replace("default_backend app", "default_backend other")
    text = text.replace("backend app", "backend other")
    data = bundle({haproxy.MAIN: text.encode()})
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    router.blobs[digest] = data
    router.revision += 1

    async def nothing() -> None:
        return None

    await router.installer.install(Target(digest, router.revision), "n-router", nothing)
    return digest


async def _no_fetch(digest: str, dest: Path) -> int:
    raise AssertionError("a reconcile downloads nothing")


def _write(path: Path, data: bytes) -> int:
    return path.write_bytes(data)
