"""Bad inputs get INVALID_ARGUMENT naming the field or member, never INTERNAL, and a bad
value is never echoed whole: errors quote a bounded prefix and stay far inside a
client's metadata limit (16 KiB), so the caller sees the field-naming INVALID_ARGUMENT
rather than the transport's RESOURCE_EXHAUSTED.

Every call here is refused and writes nothing: the module's tests share one control
plane on each backend."""

from __future__ import annotations

import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf.duration_pb2 import Duration

from controlplane.api.bundle.v1 import bundle_pb2 as bpb
from controlplane.api.node.v1 import node_pb2 as npb
from controlplane.api.notification.v1 import notification_pb2 as npf
from controlplane.api.notification.v1 import notification_pb2_grpc
from controlplane.api.rollout.v1 import rollout_pb2 as rpb
from controlplane.api.rollout.v1 import rollout_pb2_grpc
from tests.conftest import BACKENDS
from tests.support.archives import member, tar_zst
from tests.support.harness import Harness
from tests.support.module_plane import module_harnesses

pytestmark = pytest.mark.asyncio(loop_scope="module")

MIB = 1024 * 1024
# What a message may hold: enough for any field name and a readable prefix of the value.
BOUND = 2048

SHA = "sha256:" + "0" * 64
HUGE = Duration(seconds=-(2**63))


@pytest.fixture(scope="module", params=BACKENDS)
def module_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def harness(
    module_backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Harness]:
    directory = tmp_path_factory.mktemp(f"bounded-errors-{module_backend}")
    async with module_harnesses(module_backend, request, directory) as make_harness:
        yield await make_harness()


def cases(h: Harness) -> dict[str, tuple[Callable[[], Awaitable[Any]], str]]:
    rollouts = rollout_pb2_grpc.RolloutServiceStub(h.channel)
    notify = notification_pb2_grpc.NotificationServiceStub(h.channel)

    def register(**fields: Any) -> Awaitable[Any]:
        request = npb.RegisterNodeRequest(
            **{"project": "default", "enrollment_token": h.token, "name": "n1", **fields}
        )
        return h.nodes.RegisterNode(request)

    def validation(**config: Any) -> Awaitable[Any]:
        request = bpb.SetValidationConfigRequest(project="default", config=bpb.ValidationConfig(**config))
        return h.bundles.SetValidationConfig(request)

    huge_selector = "env=" + "x" * (100 * 1024)
    return {
        "a 1 MiB label value": (lambda: register(labels={"env": "v" * MIB}), "labels['env']"),
        "a 1 MiB label key": (lambda: register(labels={"k" * MIB: "v"}), "labels["),
        "a 1 MiB node name": (lambda: register(name="n" * MIB), "name"),
        "a 100 KB selector to assign": (
            lambda: h.bundles.AssignBundle(
                bpb.AssignBundleRequest(
                    project="default", target=bpb.Target(selector=huge_selector), digest=SHA
                )
            ),
            "selector",
        ),
        "a 100 KB selector to list": (
            lambda: h.nodes.ListNodes(npb.ListNodesRequest(project="default", selector=huge_selector)),
            "selector",
        ),
        "a 100 KB selector to roll out": (
            lambda: rollouts.CreateRollout(
                rpb.CreateRolloutRequest(
                    project="default",
                    selector=huge_selector,
                    bundle_digest=SHA,
                    strategy=rpb.STRATEGY_ALL_AT_ONCE,
                )
            ),
            "selector",
        ),
        "a 1 MiB digest": (
            lambda: h.bundles.GetBundle(
                bpb.GetBundleRequest(project="default", digest="sha256:" + "f" * MIB)
            ),
            "digest",
        ),
        "a 1 MiB project": (
            lambda: h.nodes.ListNodes(npb.ListNodesRequest(project="p" * MIB)),
            "project",
        ),
        # Durations past what the server's time type holds (found by test_auth_fuzz.py).
        "a group window of -2^63 s to update": (
            lambda: notify.UpdateChannel(
                npf.UpdateChannelRequest(project="default", channel_id="ch-none", group_window=HUGE)
            ),
            "group_window",
        ),
        "a group window of -2^63 s to create": (
            lambda: notify.CreateChannel(
                npf.CreateChannelRequest(
                    project="default",
                    channel=npf.ChannelSpec(
                        name="huge",
                        kind=npf.CHANNEL_KIND_WEBHOOK,
                        url="http://receiver.invalid/hook",
                        group_window=HUGE,
                    ),
                )
            ),
            "channel.group_window",
        ),
        "a validator command timeout of -2^63 s": (
            lambda: validation(commands=[bpb.CommandCheck(name="check", argv=["true"], timeout=HUGE)]),
            "config.commands[0].timeout",
        ),
        "a proxy validator timeout of -2^63 s": (
            lambda: validation(proxies=[bpb.ProxyCheck(kind=bpb.PROXY_KIND_NGINX, timeout=HUGE)]),
            "config.proxies[0].timeout",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "a 1 MiB label value",
        "a 1 MiB label key",
        "a 1 MiB node name",
        "a 100 KB selector to assign",
        "a 100 KB selector to list",
        "a 100 KB selector to roll out",
        "a 1 MiB digest",
        "a 1 MiB project",
        "a group window of -2^63 s to update",
        "a group window of -2^63 s to create",
        "a validator command timeout of -2^63 s",
        "a proxy validator timeout of -2^63 s",
    ],
)
async def test_a_huge_bad_value_gets_a_bounded_field_naming_error(harness: Harness, case: str) -> None:
    call, field = cases(harness)[case]
    with pytest.raises(grpc.RpcError) as refused:
        await call()
    error = refused.value
    details = error.details() or ""
    # A project that cannot exist is simply not found; everything else is malformed.
    expected = grpc.StatusCode.NOT_FOUND if case == "a 1 MiB project" else grpc.StatusCode.INVALID_ARGUMENT
    assert error.code() == expected, (
        error.code(),
        details[:300],
    )
    assert field in details, details[:300]
    assert len(details.encode()) <= BOUND, f"{len(details)} characters: {details[:200]}…"


def _pax(name: str, **headers: str) -> tarfile.TarInfo:
    info = member(name)
    info.pax_headers = dict(headers)
    return info


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        (_pax("placeholder", path="conf/\x00evil.kdl"), "conf/\\x00evil.kdl"),
        (_pax("placeholder", path="sub\x00dir/x"), "sub\\x00dir/x"),
    ],
)
async def test_a_member_path_holding_nul_is_invalid_argument(
    harness: Harness, entry: tarfile.TarInfo, named: str
) -> None:
    archive = tar_zst([(member("main.kdl", b"x"), b"x"), (entry, b"")])
    with pytest.raises(grpc.RpcError) as refused:
        await harness.upload(archive)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert named in (refused.value.details() or "")


async def test_a_link_target_holding_nul_is_invalid_argument(harness: Harness) -> None:
    link = member("link", kind=tarfile.SYMTYPE, linkname="placeholder")
    link.pax_headers = {"linkpath": "main\x00.kdl"}
    archive = tar_zst([(member("main.kdl", b"x"), b"x"), (link, b"")])
    with pytest.raises(grpc.RpcError) as refused:
        await harness.upload(archive)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert "'link'" in (refused.value.details() or "")
