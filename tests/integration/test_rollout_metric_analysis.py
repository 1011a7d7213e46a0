"""Metric analysis against a real Prometheus: Debian's server, started on a free loopback
port with its own config and data directory, finds the nodes through the control
plane's HTTP service discovery and scrapes real targets — one HTTP server per simulated
node, whose error ratio follows the bundle the node runs. A healthy canary promotes, one
whose error series rises rolls back, and Prometheus stopped mid-step never ends in a
promotion. Bad input is refused at creation naming the field.

The control plane, its fleet and Prometheus are shared by the module's tests on each
backend (a Prometheus scrapes its first targets only ~5 s after it starts): every test
rolls out bundles of its own, and starts once Prometheus has scraped every node at the
default ratio again. The test that stops Prometheus leaves the next one a new server."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
import pytest_asyncio

from agent_stub.simulator import FleetSimulator
from tests.conftest import BACKENDS
from tests.support.eventually import eventually
from tests.support.harness import Harness
from tests.support.module_plane import module_harnesses
from tests.support.prometheus import MetricTargets, PrometheusProcess
from tests.support.refusals import expect
from tests.support.rollout_fleet import FAST, Rollouts, archive, fleet, pb, running, seconds

pytestmark = pytest.mark.asyncio(loop_scope="module")

NODES = 3
QUERY = 'max(proxy_error_ratio{node=~"{{canary}}"})'
# What a node reports while it runs a bundle the test gave no ratio.
DEFAULT_RATIO = 0.001


@dataclass
class Shared:
    """What the module's tests share on one backend."""

    plane: Harness
    sims: list[FleetSimulator]
    # Prometheus's service-discovery URL on the control plane.
    sd_url: str
    workdir: Path
    # The error ratio a node reports while it runs a bundle (digest → ratio).
    ratios: dict[str, float] = dataclasses.field(default_factory=dict)
    prometheus: PrometheusProcess | None = None
    _runs: itertools.count[int] = dataclasses.field(default_factory=itertools.count)
    _tags: itertools.count[int] = dataclasses.field(default_factory=lambda: itertools.count(1))

    async def bundle(self) -> str:
        """A bundle no node has run yet (a rollout of one a node runs has nothing to do)."""
        return await self.plane.upload(archive(f"v{next(self._tags)}"))

    async def running_prometheus(self) -> PrometheusProcess:
        """The running Prometheus, a new one if there is none (a test stopped it)."""
        prometheus = self.prometheus
        if prometheus is None or not prometheus.running:
            # A data directory of its own: the series it finds are scraped by it.
            prometheus = PrometheusProcess(
                self.workdir / f"run{next(self._runs)}", self.sd_url, self.plane.admin_key
            )
            await prometheus.start()
            self.prometheus = prometheus
        return prometheus

    async def scraping(self) -> PrometheusProcess:
        """The running Prometheus once it has scraped every node at the default ratio:
        what an earlier test's rollout left is gone."""
        prometheus = await self.running_prometheus()

        async def scraped() -> None:
            found = await prometheus.query("proxy_error_ratio")
            assert len(found) == NODES, found
            assert all(float(s["value"][1]) == DEFAULT_RATIO for s in found), found

        await eventually(scraped, timeout=30, what="Prometheus scraping every node")
        return prometheus

    async def stop(self) -> None:
        if self.prometheus is not None:
            await self.prometheus.stop()


@pytest.fixture(scope="module", params=BACKENDS)
def module_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass
class Setup:
    """One test's view: Prometheus is running and has scraped every node."""

    plane: Harness
    prometheus: PrometheusProcess
    sims: list[FleetSimulator]
    ratios: dict[str, float]
    sd_url: str
    shared: Shared

    async def bundle(self) -> str:
        return await self.shared.bundle()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(
    module_backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Shared]:
    directory = tmp_path_factory.mktemp(f"metric-analysis-{module_backend}")
    async with (
        module_harnesses(module_backend, request, directory) as make_harness,
        AsyncExitStack() as stack,
    ):
        plane = await make_harness(**FAST, outbound_allow=("127.0.0.0/8",), http_sd_listen="127.0.0.1:0")
        assert plane.app.http_sd is not None and plane.app.http_sd._runner is not None
        sd_port = plane.app.http_sd._runner.addresses[0][1]
        sims: list[FleetSimulator] = []
        world = Shared(plane, sims, f"http://127.0.0.1:{sd_port}/sd/nodes?project=default", directory)

        def values(index: int) -> dict[str, float]:
            digest = sims[index].nodes[0].digest if index < len(sims) else ""
            return {"proxy_error_ratio": world.ratios.get(digest, DEFAULT_RATIO)}

        targets = MetricTargets(NODES, values)
        await targets.start()
        stack.push_async_callback(targets.stop)
        # Started first: its ~5 s until a first scrape overlap the fleet's start.
        stack.push_async_callback(world.stop)
        await world.running_prometheus()
        for i in range(NODES):
            labels = {"env": "prod", "metrics-host": "127.0.0.1", "metrics-port": str(targets.ports[i])}
            sim = fleet(plane.address, plane.token, 1, labels, name_prefix=f"n{i}")
            sims.append(await stack.enter_async_context(running(sim)))
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {plane.admin_key}"}
            async with session.get(world.sd_url, headers=headers) as response:
                assert response.status == 200, await response.text()
        yield world


@pytest_asyncio.fixture(loop_scope="module")
async def setup(shared: Shared) -> Setup:
    shared.ratios.clear()
    prometheus = await shared.scraping()
    return Setup(shared.plane, prometheus, shared.sims, shared.ratios, shared.sd_url, shared)


def analysis(url: str, **check: object) -> pb.MetricAnalysis:
    fields: dict[str, object] = {
        "name": "errors",
        "query": QUERY,
        "success_condition": "result < 0.05",
        "interval": seconds(1),
        "count": 3,
    }
    fields.update(check)
    return pb.MetricAnalysis(provider_url=url, metrics=[pb.MetricCheck(**fields)])  # type: ignore[arg-type]


async def create(rollouts: Rollouts, digest: str, metric_analysis: pb.MetricAnalysis) -> pb.Rollout:
    return await rollouts.create(
        digest, rolling=pb.RollingParams(batch_size=1), metric_analysis=metric_analysis
    )


async def test_the_sd_endpoint_lists_nodes_for_a_reader_only(setup: Setup) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(setup.sd_url) as response:
            assert response.status in {401, 403}
        headers = {"Authorization": f"Bearer {setup.plane.admin_key}"}
        async with session.get(setup.sd_url, headers=headers) as response:
            groups = json.loads(await response.text())
    ids = {sim.nodes[0].node_id for sim in setup.sims}
    assert {g["labels"]["node"] for g in groups} == ids
    assert all(
        g["labels"]["label_env"] == "prod" and g["targets"][0].startswith("127.0.0.1:") for g in groups
    )


async def test_a_healthy_canary_promotes_on_real_series(setup: Setup) -> None:
    rollouts = Rollouts(setup.plane.channel)
    v1 = await setup.bundle()
    created = await create(rollouts, v1, analysis(setup.prometheus.url))
    assert (await rollouts.watch(created.id, timeout=90)).last_state == pb.ROLLOUT_STATE_SUCCEEDED
    view = await rollouts.get(created.id)
    for step in view.steps:
        phases = [m.phase for m in step.measurements]
        assert phases == ["successful"] * 3, phases
        assert all(m.HasField("value") and m.value < 0.05 for m in step.measurements)
    events = [e.message for e in await rollouts.events(created.id)]
    assert sum(1 for m in events if "metric analysis passed" in m) == NODES, events


async def test_a_canary_whose_error_series_rises_rolls_back(setup: Setup) -> None:
    rollouts = Rollouts(setup.plane.channel)
    v1 = await setup.bundle()
    setup.ratios[v1] = 0.3
    created = await create(rollouts, v1, analysis(setup.prometheus.url))
    assert (await rollouts.watch(created.id, timeout=90)).last_state == pb.ROLLOUT_STATE_ROLLED_BACK
    rollout = await rollouts.get(created.id)
    assert "metric analysis at step 0" in rollout.reason and "does not hold" in rollout.reason, rollout.reason
    assert rollout.steps[1].state == pb.STEP_STATE_PENDING
    failed = [m for m in rollout.steps[0].measurements if m.phase == "failed"]
    assert failed and failed[-1].value == pytest.approx(0.3)


async def test_bad_analysis_is_refused_at_creation_naming_the_field(setup: Setup) -> None:
    rollouts = Rollouts(setup.plane.channel)
    v1 = await setup.bundle()
    url = setup.prometheus.url
    bad = grpc.StatusCode.INVALID_ARGUMENT
    cases = [
        (analysis(url, query="sum(rate(x[1m])"), "metric_analysis.metrics[0].query"),
        (analysis("ftp://prometheus:9090"), "metric_analysis.provider_url"),
        (analysis("http://169.254.169.254:9090"), "metric_analysis.provider_url"),
        (analysis(url, success_condition="value < 1"), "metric_analysis.metrics[0].success_condition"),
        (analysis(url, success_condition=""), "metric_analysis.metrics[0].success_condition"),
        (analysis(url, failure_limit=3), "metric_analysis.metrics[0].failure_limit"),
        (analysis(url, interval=seconds(0)), "metric_analysis.metrics[0].interval"),
        (pb.MetricAnalysis(provider_url=url), "metric_analysis.metrics"),
    ]
    listing = pb.ListRolloutsRequest(project="default")
    before = await rollouts.stub.ListRollouts(listing)
    for spec, field in cases:
        await expect(bad, create(rollouts, v1, spec), field)
    # Earlier tests of the module made rollouts: these made none.
    assert (await rollouts.stub.ListRollouts(listing)).rollouts == before.rollouts


async def test_a_query_returning_several_series_is_a_failed_measurement(setup: Setup) -> None:
    """A vector of several series where one value is needed: counted as failed with the
    reason, never a pass."""
    rollouts = Rollouts(setup.plane.channel)
    v1 = await setup.bundle()
    several = analysis(setup.prometheus.url, query="proxy_error_ratio", count=2, failure_limit=1)
    created = await create(rollouts, v1, several)
    assert (await rollouts.watch(created.id, timeout=90)).last_state == pb.ROLLOUT_STATE_ROLLED_BACK
    rollout = await rollouts.get(created.id)
    assert "3 series" in rollout.reason, rollout.reason


async def test_dry_run_records_the_verdict_without_acting(setup: Setup) -> None:
    rollouts = Rollouts(setup.plane.channel)
    v1 = await setup.bundle()
    setup.ratios[v1] = 0.3
    # Six looks a second apart: on a slow machine the first ones may come before
    # Prometheus has scraped the step's node on v1 (it scrapes every second).
    dry = analysis(setup.prometheus.url, count=6)
    dry.dry_run = True
    created = await create(rollouts, v1, dry)
    assert (await rollouts.watch(created.id, timeout=90)).last_state == pb.ROLLOUT_STATE_SUCCEEDED
    events = [e.message for e in await rollouts.events(created.id)]
    assert any("(dry run) would roll back" in m for m in events), events


# Last in the module: a test after it waits for a new Prometheus to scrape (~5 s).
async def test_prometheus_stopped_mid_step_never_promotes(setup: Setup) -> None:
    rollouts = Rollouts(setup.plane.channel)
    v1 = await setup.bundle()
    created = await create(rollouts, v1, analysis(setup.prometheus.url, count=6, failure_limit=1))

    async def measured() -> None:
        view = await rollouts.get(created.id)
        assert any(m.phase == "successful" for m in view.steps[0].measurements)

    await eventually(measured, timeout=30, what="a first measurement")
    await setup.prometheus.stop()
    assert (await rollouts.watch(created.id, timeout=90)).last_state == pb.ROLLOUT_STATE_ROLLED_BACK
    rollout = await rollouts.get(created.id)
    assert "cannot connect" in rollout.reason, rollout.reason
    assert [s.state for s in rollout.steps][1:] == [pb.STEP_STATE_PENDING] * (NODES - 1)
    errors = [m for m in rollout.steps[0].measurements if m.phase == "error"]
    assert len(errors) == 2 and not any(m.HasField("value") for m in errors)
