"""Bad and hostile input: the right status, a message naming the field, nothing lost,
nothing half-written, and an open stream beside it is not disturbed."""

from __future__ import annotations

import tarfile
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from controlplane.api.bundle.v1 import bundle_pb2 as bpb
from controlplane.api.node.v1 import node_pb2 as npb
from controlplane.api.watch.v1 import watch_pb2 as wpb
from controlplane.domain import desired as retention
from controlplane.domain.audit.context import acting_as, system
from controlplane.rpc.server import MAX_RECEIVE_BYTES
from tests.support.archives import bundle, member, tar_zst
from tests.support.harness import Harness, Recorder, Registered
from tests.support.refusals import expect

SHA_UNKNOWN = "sha256:" + "0" * 64


@pytest.fixture
async def bystander(harness: Harness) -> AsyncIterator[tuple[Registered, Recorder]]:
    """A node watching throughout; checked untouched at the end of each test."""
    node = await harness.register("bystander", {"env": "prod"})
    rec = harness.open_watch(node)
    await rec.wait_for(lambda r: "snapshot_end" in r.kinds)
    yield node, rec
    digest = await harness.upload(bundle({"after": b"the storm"}))
    await harness.assign(digest, selector="env=prod")
    await rec.wait_digest(digest)
    assert rec.error is None and not rec.ended.is_set()
    await rec.cancel()


async def test_registration_errors(harness: Harness, bystander: object) -> None:
    def register(**kwargs: Any) -> Any:
        fields: dict[str, Any] = {
            "project": "default",
            "enrollment_token": harness.token,
            "name": "n1",
            **kwargs,
        }
        return harness.nodes.RegisterNode(npb.RegisterNodeRequest(**fields))

    await expect(grpc.StatusCode.INVALID_ARGUMENT, register(labels={"bad key": "x"}), "labels['bad key']")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, register(labels={"env": "has space"}), "labels['env']")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, register(labels={"k" * 64: "v"}), "labels[")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, register(name="../etc"), "name")
    await expect(grpc.StatusCode.NOT_FOUND, register(project="nope"), "project")
    await expect(grpc.StatusCode.UNAUTHENTICATED, register(enrollment_token="cpe_forged"), "enrollment token")
    await expect(grpc.StatusCode.UNAUTHENTICATED, register(enrollment_token=""), "enrollment_token")
    listed = await harness.nodes.ListNodes(npb.ListNodesRequest(project="default"))
    assert [n.name for n in listed.nodes] == ["bystander"]  # nothing half-registered


async def test_unknown_nodes_and_bad_queries(harness: Harness, bystander: object) -> None:
    await expect(
        grpc.StatusCode.NOT_FOUND, harness.nodes.GetNode(npb.GetNodeRequest(node_id="n-nope")), "node_id"
    )
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        harness.nodes.ListNodes(npb.ListNodesRequest(project="default", selector="env")),
        "selector",
    )
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        harness.nodes.ListNodes(npb.ListNodesRequest(project="default", page_size=5000)),
        "page_size",
    )
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        harness.nodes.ListNodes(npb.ListNodesRequest(project="default", page_token="%%%")),
        "page_token",
    )
    await expect(
        grpc.StatusCode.NOT_FOUND,
        harness.nodes.UpdateNodeLabels(npb.UpdateNodeLabelsRequest(node_id="n-nope", labels={"a": "b"})),
        "node_id",
    )


async def test_node_credentials_are_bound_to_their_node(
    harness: Harness, bystander: tuple[Registered, Recorder]
) -> None:
    other, _ = bystander
    me = await harness.register("me")
    hijack = harness.watch.WatchBundles(wpb.WatchBundlesRequest(node_id=other.node_id), metadata=me.metadata)
    await expect(grpc.StatusCode.PERMISSION_DENIED, hijack.read(), "node_id")
    anonymous = harness.watch.WatchBundles(wpb.WatchBundlesRequest(node_id=me.node_id))
    await expect(grpc.StatusCode.UNAUTHENTICATED, anonymous.read(), "node credential")
    forged = harness.watch.WatchBundles(
        wpb.WatchBundlesRequest(node_id=me.node_id),
        metadata=(("authorization", f"Bearer {me.node_id}.forged"),),
    )
    await expect(grpc.StatusCode.UNAUTHENTICATED, forged.read(), "credential")
    await expect(
        grpc.StatusCode.PERMISSION_DENIED,
        harness.nodes.Heartbeat(npb.HeartbeatRequest(node_id=other.node_id), metadata=me.metadata),
        "node_id",
    )
    await expect(
        grpc.StatusCode.PERMISSION_DENIED,
        harness.nodes.ListNodes(npb.ListNodesRequest(project="default"), metadata=me.metadata),
    )


async def test_absurd_since_revision(harness: Harness, bystander: object) -> None:
    node = await harness.register("n1")
    negative = harness.open_watch(node, since=-1)
    await negative.ended.wait()
    assert negative.error is not None and negative.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "since_revision" in (negative.error.details() or "")
    first = harness.open_watch(node)
    await first.wait_for(lambda r: "snapshot_end" in r.kinds)
    epoch = first.epoch
    await first.cancel()

    async def reset(since: int, sent_epoch: str) -> wpb.Reset:
        rec = harness.open_watch(node, since=since, epoch=sent_epoch)
        await rec.wait_for(lambda r: "snapshot_end" in r.kinds, what="bootstrap after reset")
        await rec.cancel()
        assert rec.kinds[:4] == ["started", "reset", "desired", "snapshot_end"], rec.kinds
        (started,) = rec.of("started")
        assert started.mode == wpb.STREAM_MODE_BOOTSTRAP
        result: wpb.Reset = rec.of("reset")[0]
        assert (result.floor_revision, result.head_revision, result.epoch) == (
            started.floor_revision,
            started.head_revision,
            epoch,
        )
        return result

    assert (await reset(2**62, epoch)).reason == wpb.RESET_REASON_AHEAD_OF_HEAD
    assert (await reset(2**62, "")).reason == wpb.RESET_REASON_EPOCH_CHANGED
    assert (await reset(1, "not-the-epoch")).reason == wpb.RESET_REASON_EPOCH_CHANGED
    # Raise the floor past revision 1 (retention, run now): a cursor below it is too old.
    digest = await harness.upload(bundle({"a": b"1"}))
    for _ in range(2):
        head = await harness.assign(digest, nodes=[node.node_id])
    with acting_as(system("retention")):
        await retention.prune(harness.app.store, head)
    await harness.app.hub.catch_up()
    too_old = await reset(1, epoch)
    assert too_old.reason == wpb.RESET_REASON_TOO_OLD and too_old.floor_revision == head


async def test_bad_heartbeats(harness: Harness, bystander: object) -> None:
    node = await harness.register("n1")

    def beat(**metrics: Any) -> Any:
        request = npb.HeartbeatRequest(node_id=node.node_id, metrics=npb.NodeMetrics(**metrics))
        return harness.nodes.Heartbeat(request, metadata=node.metadata)

    await expect(grpc.StatusCode.INVALID_ARGUMENT, beat(error_rate=2.0), "metrics.error_rate")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, beat(cpu_percent=float("nan")), "metrics.cpu_percent")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, beat(p99_latency_ms=-1.0), "metrics.p99_latency_ms")
    bad_digest = npb.HeartbeatRequest(node_id=node.node_id, applied_digest="md5:abc")
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        harness.nodes.Heartbeat(bad_digest, metadata=node.metadata),
        "applied_digest",
    )
    got = await harness.nodes.GetNode(npb.GetNodeRequest(node_id=node.node_id))
    assert not got.node.HasField("last_heartbeat")  # nothing recorded


async def test_reports_for_what_was_never_sent(harness: Harness, bystander: object) -> None:
    sent = await harness.upload(bundle({"a": b"sent"}))
    never = await harness.upload(bundle({"a": b"never assigned"}))
    node = await harness.register("n1")
    rec = harness.open_watch(node)
    await harness.assign(sent, nodes=[node.node_id])
    desired = await rec.wait_digest(sent)

    def report(**kwargs: Any) -> Any:
        fields: dict[str, Any] = {
            "node_id": node.node_id,
            "stream_id": rec.stream_id,
            "revision": desired.revision,
            "digest": sent,
            "phase": npb.REPORT_PHASE_ACTIVE,
            **kwargs,
        }
        return harness.nodes.ReportStatus(npb.ReportStatusRequest(**fields), metadata=node.metadata)

    await expect(grpc.StatusCode.OUT_OF_RANGE, report(revision=10**9), "revision")
    await expect(grpc.StatusCode.FAILED_PRECONDITION, report(digest=never), "never sent")
    await expect(grpc.StatusCode.FAILED_PRECONDITION, report(stream_id="dead-stream", digest=never), "digest")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, report(phase=npb.REPORT_PHASE_UNSPECIFIED), "phase")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, report(phase=npb.REPORT_PHASE_FAILED), "error")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, report(digest="sha256:xyz"), "digest")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, report(revision=0), "revision")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, report(stream_id=""), "stream_id")
    got = await harness.nodes.GetNode(npb.GetNodeRequest(node_id=node.node_id))
    assert got.node.applied_digest == "" and not got.node.HasField("last_report")
    # The real acknowledgement still works, and a replayed older one is refused.
    await report()
    await expect(grpc.StatusCode.FAILED_PRECONDITION, report(phase=npb.REPORT_PHASE_DOWNLOADED), "stale")
    await rec.cancel()


# Each hostile archive, and the reason the refusal must give (after "chunk: member ...").
HOSTILE = {
    "absolute path": ([(member("/etc/passwd", b"x"), b"x")], "'/etc/passwd' is refused: absolute path"),
    "dot-dot": (
        [(member("../../escape", b"x"), b"x")],
        "'../../escape' is refused: '..' climbs out of the bundle",
    ),
    "symlink escaping": (
        [(member("link", kind=tarfile.SYMTYPE, linkname="../../etc/shadow"), b"")],
        "'link' is refused: symlink '../../etc/shadow' points outside the bundle",
    ),
    "absolute symlink": (
        [(member("link", kind=tarfile.SYMTYPE, linkname="/etc/shadow"), b"")],
        "'link' is refused: symlink to absolute path '/etc/shadow'",
    ),
    # Each link stays inside by its name; followed on disk, `out` is the bundle's parent.
    "symlink chain escaping": (
        [
            (member("up", kind=tarfile.SYMTYPE, linkname="."), b""),
            (member("out", kind=tarfile.SYMTYPE, linkname="up/.."), b""),
        ],
        "'out' is refused: symlink resolves outside the bundle",
    ),
    "hardlink escaping": (
        [(member("hard", kind=tarfile.LNKTYPE, linkname="../outside"), b"")],
        "'hard' is refused: hardlink to '../outside' leaves the bundle",
    ),
    "device file": (
        [(member("dev", kind=tarfile.CHRTYPE), b"")],
        "'dev' is refused: device file, not a regular file",
    ),
    "fifo": ([(member("pipe", kind=tarfile.FIFOTYPE), b"")], "'pipe' is refused: fifo, not a regular file"),
    "duplicate member": ([(member("a", b"1"), b"1"), (member("a", b"2"), b"2")], "'a' appears twice"),
    "too big": (
        [(member("huge", b"x" * 2048), b"x" * 2048)],
        "'huge': larger than the limit of 1024 bytes",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_archives_are_refused_whole(harness: Harness, case: str, bystander: object) -> None:
    entries, reason = HOSTILE[case]
    harness.app.bundles.limits = type(harness.app.bundles.limits)(max_file_bytes=1024)
    archive = tar_zst([(member("main.conf", b"ok"), b"ok"), *entries])
    details = await expect(grpc.StatusCode.INVALID_ARGUMENT, harness.upload(archive), reason)
    assert details.startswith("chunk: "), details
    listed = await harness.bundles.ListBundles(bpb.ListBundlesRequest(project="default"))
    assert list(listed.bundles) == []
    blobs = harness.app.settings.data_dir / "blobs"
    assert not any(p.is_file() for p in blobs.rglob("*"))


def _padded(name: str, padding: int) -> tarfile.TarInfo:
    """An empty file whose pax header carries `padding` bytes no size check counts."""
    info = member(name)
    info.pax_headers = {"comment": "x" * padding}
    return info


async def test_garbage_and_bombs_are_refused(harness: Harness, bystander: object) -> None:
    await expect(grpc.StatusCode.INVALID_ARGUMENT, harness.upload(b"not an archive at all"), "not a valid")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, harness.upload(b""), "chunk")
    limits = type(harness.app.bundles.limits)
    harness.app.bundles.limits = limits(max_total_bytes=1024 * 1024)
    zeros = b"\0" * (8 * 1024 * 1024)
    bomb = tar_zst([(member("zeros", zeros), zeros)])
    assert len(bomb) < 4096
    # Its header announces the size: refused before a byte of it is written.
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT, harness.upload(bomb), "files exceed the limit of 1048576 bytes"
    )
    # Headers that announce nothing: the stream itself is counted as it decompresses and
    # cut at the limit (the files plus headers and padding).
    harness.app.bundles.limits = limits(max_total_bytes=1024 * 1024, max_members=10)
    sneaky = tar_zst((_padded(f"f{i}", 1000 * 1000), b"") for i in range(4))
    assert len(sneaky) < 16 * 1024
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        harness.upload(sneaky),
        f"archive decompresses past the limit of {1024 * 1024 + 26 * 4096} bytes",
    )
    harness.app.bundles.limits = limits(max_members=100)
    many = tar_zst((member(f"f{i}", b""), b"") for i in range(101))
    await expect(grpc.StatusCode.INVALID_ARGUMENT, harness.upload(many), "more than 100 members")


async def test_oversized_message_is_refused_by_the_transport(harness: Harness, bystander: object) -> None:
    async def requests() -> AsyncIterator[bpb.UploadBundleRequest]:
        yield bpb.UploadBundleRequest(
            header=bpb.UploadBundleHeader(project="default"), chunk=b"x" * (5 * 1024 * 1024)
        )

    details = await expect(
        grpc.StatusCode.RESOURCE_EXHAUSTED, harness.bundles.UploadBundle(requests()), "larger than max"
    )
    # The transport names what is wrong: the message's size against the limit.
    assert str(MAX_RECEIVE_BYTES) in details, details


async def test_upload_stream_shape(harness: Harness, bystander: object) -> None:
    async def no_header() -> AsyncIterator[bpb.UploadBundleRequest]:
        yield bpb.UploadBundleRequest(chunk=b"abc")

    async def two_headers() -> AsyncIterator[bpb.UploadBundleRequest]:
        header = bpb.UploadBundleHeader(project="default")
        yield bpb.UploadBundleRequest(header=header, chunk=b"abc")
        yield bpb.UploadBundleRequest(header=header, chunk=b"def")

    await expect(grpc.StatusCode.INVALID_ARGUMENT, harness.bundles.UploadBundle(no_header()), "header")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, harness.bundles.UploadBundle(two_headers()), "header")
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        harness.upload(bundle({"a": b"1"}), version="bad version!"),
        "version",
    )
    await expect(grpc.StatusCode.NOT_FOUND, harness.upload(bundle({"a": b"1"}), project="nope"), "project")


async def test_bad_assignments_write_nothing(harness: Harness, bystander: object) -> None:
    digest = await harness.upload(bundle({"a": b"1"}))
    head = harness.app.hub.position

    def assign(**kwargs: Any) -> Any:
        fields: dict[str, Any] = {
            "project": "default",
            "digest": digest,
            "target": bpb.Target(selector="*"),
            **kwargs,
        }
        return harness.bundles.AssignBundle(bpb.AssignBundleRequest(**fields))

    await expect(grpc.StatusCode.NOT_FOUND, assign(digest=SHA_UNKNOWN), "digest")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, assign(digest="latest"), "digest")
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT, assign(target=bpb.Target(selector="env==")), "target.selector"
    )
    await expect(grpc.StatusCode.INVALID_ARGUMENT, assign(target=bpb.Target()), "target")
    await expect(
        grpc.StatusCode.NOT_FOUND,
        assign(target=bpb.Target(nodes=bpb.NodeList(node_ids=["n-nope"]))),
        "n-nope",
    )
    await expect(grpc.StatusCode.INVALID_ARGUMENT, assign(traffic_weight=101), "traffic_weight")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, assign(pin=True), "pin")
    await expect(grpc.StatusCode.NOT_FOUND, assign(project="nope"), "project")
    await expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        harness.bundles.UnassignBundle(
            bpb.UnassignBundleRequest(project="default", target=bpb.Target(selector="a=b"))
        ),
        "nothing is assigned",
    )
    await harness.app.hub.catch_up()
    assert harness.app.hub.position == head  # no revision was spent on any of them
