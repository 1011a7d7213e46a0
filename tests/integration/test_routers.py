"""Router nodes against an in-process control plane and simulated nodes (real agents over
real gRPC, simulated proxies): declaring one, its routing table on its own watch, the
weights rollouts set, a step waiting for the router's acknowledgement, a refusal, and
every refused input. The real HAProxy router is tests/e2e/test_routers.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from click.testing import CliRunner

from agent_stub.simulator import FleetSimulator, SimNode
from controlplane.api.node.v1 import node_pb2
from controlplane.cli.main import cli
from controlplane.domain.model.roles import Role
from tests.conftest import HarnessFactory
from tests.support.eventually import eventually
from tests.support.harness import Harness, auth
from tests.support.rollout_fleet import FAST, Rollouts, archive, fleet, pb, running, seconds


@pytest.fixture
async def plane(make_harness: HarnessFactory) -> Harness:
    return await make_harness(**FAST)


@asynccontextmanager
async def web_and_router(
    plane: Harness, backends: int = 2, **router: Any
) -> AsyncIterator[tuple[FleetSimulator, SimNode]]:
    """`backends` nodes `env=prod` with addresses, and one router node `role=router`
    running a bundle of its own."""
    web = fleet(plane.address, plane.token, backends, name_prefix="web", address_port=20100)
    edge = fleet(plane.address, plane.token, 1, labels={"role": "router"}, name_prefix="edge", **router)
    async with running(web), running(edge):
        node = edge.nodes[0]
        own = await plane.upload(archive("router"))
        await plane.assign(own, nodes=[node.node_id])
        await eventually(lambda: _runs(node, own), what="the router running its bundle")
        yield web, node


async def _runs(node: SimNode, digest: str) -> None:
    assert node.digest == digest


def weights(node: SimNode) -> dict[str, int]:
    assert node.routes is not None
    return {name.removeprefix("cp-"): s.weight for name, s in node.routes.servers.items()}


async def get_router(plane: Harness, node_id: str) -> node_pb2.Router:
    return (await plane.nodes.GetRouter(node_pb2.GetRouterRequest(node_id=node_id))).router


async def declare(
    plane: Harness, node_id: str, selector: str = "env=prod", backend: str = "app"
) -> node_pb2.Router:
    request = node_pb2.DeclareRouterRequest(node_id=node_id, selector=selector, backend=backend)
    return (await plane.nodes.DeclareRouter(request)).router


async def test_a_router_gets_its_selectors_backends_and_follows_what_they_serve(plane: Harness) -> None:
    async with web_and_router(plane, backends=3) as (web, router):
        ids = [n.node_id for n in web.nodes]
        declared = await declare(plane, router.node_id)
        assert declared.selector == "env=prod" and declared.backend == "app"
        assert {b.node_id: b.address for b in declared.backends} == {
            n.node_id: f"127.0.0.1:{20100 + n.index}" for n in web.nodes
        }
        # Nothing assigned to the backends yet: they run nothing, so they take nothing.
        assert {b.weight for b in declared.backends} == {0}
        await eventually(lambda: _routed(router, dict.fromkeys(ids, 0)), what="the first table applied")

        v1 = await plane.upload(archive("v1"))
        await plane.assign(v1, selector="env=prod")

        # Once each backend reports it runs v1, the router sends it an equal share.
        await eventually(lambda: _routed(router, dict.fromkeys(ids, 256)), timeout=20, what="equal weights")
        view = await get_router(plane, router.node_id)
        assert view.revision > declared.revision and "equal shares" in view.reason
        await eventually(lambda: _acked(plane, router.node_id, view.revision), what="the router's ACK")

        # A node relabelled out of the selector leaves the table; back in, it returns.
        await plane.nodes.UpdateNodeLabels(
            node_pb2.UpdateNodeLabelsRequest(node_id=ids[0], labels={"env": "dev"})
        )
        await eventually(lambda: _routed(router, dict.fromkeys(ids[1:], 256)), what="the node gone")


async def _routed(node: SimNode, expected: dict[str, int]) -> None:
    assert node.routes is not None and weights(node) == expected, node.routes


async def test_a_router_reconnecting_resumes_onto_its_latest_table(plane: Harness) -> None:
    async with web_and_router(plane) as (web, router):
        v1 = await plane.upload(archive("v1"))
        await plane.assign(v1, selector="env=prod")
        await declare(plane, router.node_id)
        ids = [n.node_id for n in web.nodes]
        await eventually(lambda: _routed(router, dict.fromkeys(ids, 256)), timeout=20, what="equal weights")
        edge = router.sim
        await edge.stop_node(0)
        # While it is away the table changes: a backend leaves the selector.
        await plane.nodes.UpdateNodeLabels(
            node_pb2.UpdateNodeLabelsRequest(node_id=ids[1], labels={"env": "dev"})
        )
        resumes = router.agent.counters.resumes if router.agent else 0
        edge.start_node(0)
        await eventually(lambda: _routed(router, {ids[0]: 256}), timeout=20, what="the table after the gap")
        assert router.agent is not None and router.agent.counters.resumes == resumes + 1, (
            "resumed, not bootstrapped"
        )
        view = await get_router(plane, router.node_id)
        await eventually(lambda: _acked(plane, router.node_id, view.revision), what="the router's ACK")


async def _acked(plane: Harness, node_id: str, revision: int) -> None:
    assert (await get_router(plane, node_id)).applied_revision >= revision


async def test_a_canary_step_waits_for_the_routers_acknowledgement(plane: Harness) -> None:
    async with web_and_router(plane) as (web, router):
        v1 = await plane.upload(archive("v1"))
        await plane.assign(v1, selector="env=prod")
        await declare(plane, router.node_id)
        ids = [n.node_id for n in web.nodes]
        await eventually(lambda: _routed(router, dict.fromkeys(ids, 256)), timeout=20, what="equal weights")
        rollouts = Rollouts(plane.channel)

        # The router is down: the step's nodes go ACTIVE, and the step waits for it.
        await router.sim.stop_node(0)
        v2 = await plane.upload(archive("v2"))
        created = await _canary(rollouts, v2)
        assert created.progress.traffic == f"applied by router(s) {router.node_id}"

        async def waiting() -> None:
            step = (await rollouts.get(created.id)).steps[0]
            assert [(r.node_id, r.state) for r in step.routers] == [(router.node_id, "waiting")]
            assert step.state == pb.STEP_STATE_APPLYING

        await eventually(waiting, timeout=20, what="step 0 waiting for the router")
        router.sim.start_node(0)
        await eventually(lambda: _step_done(rollouts, created.id, 0), timeout=20, what="step 0 done")
        step = (await rollouts.get(created.id)).steps[0]
        assert [r.state for r in step.routers] == ["applied"]
        # The router runs the revision the step waited for: 10 % to the canary node.
        new = next(n.node_id for n in await rollouts.nodes(created.id) if n.step == 0)
        old = next(i for i in ids if i != new)
        assert router.routes is not None and router.routes.revision >= step.routers[0].revision
        assert weights(router) == {new: 28, old: 256}
        events = [e.message for e in await rollouts.events(created.id) if e.kind == "traffic"]
        assert any("applied its routing table" in m for m in events), events


async def _canary(rollouts: Rollouts, digest: str) -> pb.Rollout:
    created = await rollouts.create(
        digest,
        strategy=pb.STRATEGY_CANARY,
        canary=pb.CanaryParams(steps_percent=[10, 100], analysis=pb.CanaryAnalysis(min_sample=1)),
        gates=pb.HealthGates(),
        bake_time=seconds(3600),
        progress_deadline=seconds(7200),
    )
    return created


async def _step_done(rollouts: Rollouts, rollout_id: str, index: int) -> None:
    assert (await rollouts.get(rollout_id)).steps[index].state in (pb.STEP_STATE_BAKING, pb.STEP_STATE_DONE)


async def test_a_router_refusing_its_weights_rolls_the_canary_back(plane: Harness) -> None:
    async with web_and_router(plane) as (web, router):
        v1 = await plane.upload(archive("v1"))
        await plane.assign(v1, selector="env=prod")
        await declare(plane, router.node_id)
        ids = [n.node_id for n in web.nodes]
        await eventually(lambda: _routed(router, dict.fromkeys(ids, 256)), timeout=20, what="equal weights")
        router.refuse_routes = "weight out of range for this proxy"
        rollouts = Rollouts(plane.channel)
        created = await _canary(rollouts, await plane.upload(archive("v2")))
        done = await rollouts.wait_state(created.id, pb.ROLLOUT_STATE_ROLLED_BACK, timeout=30)
        assert f"router {router.node_id} refused the routing table of step 0" in done.reason, done.reason
        assert "weight out of range for this proxy" in done.reason
        assert [r.state for r in done.steps[0].routers] == ["refused"]
        view = await get_router(plane, router.node_id)
        assert "weight out of range" in view.error


async def test_weights_not_applied_are_said_plainly(plane: Harness) -> None:
    async with running(fleet(plane.address, plane.token, 2)):
        v1 = await plane.upload(archive("v1"))
        rollouts = Rollouts(plane.channel)
        created = await _canary(rollouts, v1)
        assert created.progress.traffic.startswith("not applied: no router routes this rollout's nodes")
        events = [e.message for e in await rollouts.events(created.id) if e.kind == "traffic"]
        assert events and events[0].startswith("traffic weights: not applied"), events


async def test_refused_inputs(plane: Harness) -> None:
    async with running(fleet(plane.address, plane.token, 1, name_prefix="bare")) as bare:
        no_address = bare.nodes[0].node_id
        async with web_and_router(plane) as (_, router):
            cases: list[tuple[node_pb2.DeclareRouterRequest, grpc.StatusCode, str]] = [
                (
                    node_pb2.DeclareRouterRequest(node_id="n-nope", selector="env=prod", backend="app"),
                    grpc.StatusCode.NOT_FOUND,
                    "node 'n-nope' does not exist",
                ),
                (
                    node_pb2.DeclareRouterRequest(
                        node_id=router.node_id, selector="env=staging", backend="app"
                    ),
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "matches no node of project 'default' besides the router",
                ),
                (
                    node_pb2.DeclareRouterRequest(node_id=router.node_id, selector="env=prod", backend="app"),
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"registered no address, so the router could send them no traffic: {no_address}",
                ),
                (
                    node_pb2.DeclareRouterRequest(node_id=router.node_id, selector="env=prod", backend="a b"),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "backend",
                ),
                (
                    node_pb2.DeclareRouterRequest(
                        node_id=router.node_id, selector="env=prod!", backend="app"
                    ),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "selector",
                ),
            ]
            for request, code, phrase in cases:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await plane.nodes.DeclareRouter(request)
                assert refused.value.code() == code, (request, refused.value.details())
                assert phrase in (refused.value.details() or ""), refused.value.details()

            with pytest.raises(grpc.aio.AioRpcError) as not_router:
                await plane.nodes.RemoveRouter(node_pb2.RemoveRouterRequest(node_id=router.node_id))
            assert not_router.value.code() == grpc.StatusCode.NOT_FOUND
            assert "is not a router" in (not_router.value.details() or "")

            reader = await plane.api_key({"default": Role.READER})
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await plane.nodes.DeclareRouter(
                    node_pb2.DeclareRouterRequest(node_id=router.node_id, selector="app=x", backend="app"),
                    metadata=auth(reader),
                )
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

    for address, phrase in [
        ("localhost", "is not host:port"),
        ("127.0.0.1:0", "port must be a number from 1 to 65535"),
        ("0.0.0.0:80", "not an address a router can send requests to"),
        ("::1:80", "write an IPv6 address in brackets"),
        ("bad_host!:80", "neither an IP address nor a DNS name"),
        ("x" * 400 + ":80", "at most 300 characters"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await plane.nodes.RegisterNode(
                node_pb2.RegisterNodeRequest(
                    project="default", enrollment_token=plane.token, name="addr", address=address
                )
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, address
        details = bad.value.details() or ""
        assert phrase in details and "address" in details and len(details) < 600, details


async def test_removing_a_router_withdraws_its_table(plane: Harness) -> None:
    async with web_and_router(plane) as (web, router):
        v1 = await plane.upload(archive("v1"))
        await plane.assign(v1, selector="env=prod")
        await declare(plane, router.node_id)
        ids = [n.node_id for n in web.nodes]
        await eventually(lambda: _routed(router, dict.fromkeys(ids, 256)), timeout=20, what="equal weights")
        listed = (await plane.nodes.ListRouters(node_pb2.ListRoutersRequest(project="default"))).routers
        assert [r.node_id for r in listed] == [router.node_id]
        await plane.nodes.RemoveRouter(node_pb2.RemoveRouterRequest(node_id=router.node_id))
        await eventually(lambda: _withdrawn(router), what="the table withdrawn")
        assert not (await plane.nodes.ListRouters(node_pb2.ListRoutersRequest(project="default"))).routers


async def _withdrawn(node: SimNode) -> None:
    assert node.routes is None


async def test_the_router_commands(plane: Harness) -> None:
    """`controlplane nodes router set|get|list|remove`, and `rollout get` saying where a
    rollout's weights are applied."""

    async def run(*args: str) -> Any:
        base = ["--api-key", plane.admin_key, *args, "--server", plane.address, "-o", "json"]
        result = await asyncio.to_thread(CliRunner().invoke, cli, base)
        return result

    async with web_and_router(plane) as (_, router):
        declared = await run(
            "nodes", "router", "set", "--selector", "env=prod", "--backend", "app", router.node_id
        )
        assert declared.exit_code == 0, declared.output
        answer = json.loads(declared.output)["router"]
        assert answer["selector"] == "env=prod" and len(answer["backends"]) == 2
        got = await run("nodes", "router", "get", router.node_id)
        assert got.exit_code == 0 and json.loads(got.output)["router"]["backend"] == "app", got.output
        listed = await run("nodes", "router", "list", "--project", "default")
        assert [r["node_id"] for r in json.loads(listed.output)["routers"]] == [router.node_id], listed.output
        refused = await run(
            "nodes", "router", "set", "--selector", "env=none", "--backend", "app", router.node_id
        )
        assert refused.exit_code != 0 and "matches no node" in refused.output, refused.output

        v1 = await plane.upload(archive("v1"))
        created = await _canary(Rollouts(plane.channel), v1)
        shown = await run("rollout", "get", created.id)
        assert (
            json.loads(shown.output)["rollout"]["progress"]["traffic"]
            == f"applied by router(s) {router.node_id}"
        )

        removed = await run("nodes", "router", "remove", router.node_id)
        assert removed.exit_code == 0 and int(json.loads(removed.output)["revision"]) > 0, removed.output
