"""The bundle pipeline end to end through the gRPC API, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from nacl.signing import VerifyKey

from controlplane.api.bundle.v1 import bundle_pb2 as bpb
from controlplane.api.bundle.v1 import signing_pb2, signing_pb2_grpc
from controlplane.api.node.v1 import node_pb2 as npb
from controlplane.blobs.local import LocalBlobStore
from controlplane.domain.bundles import intake as bundle_intake
from controlplane.domain.bundles.archive import tar_intake
from controlplane.domain.bundles.archive import tree as tree_module
from controlplane.domain.bundles.intake import IntakeDeadlines
from controlplane.domain.bundles.signing import CONTEXT
from controlplane.domain.bundles.slots import IntakeSlots
from tests.support.bundles import create, file_messages, tar_messages, tar_of
from tests.support.eventually import eventually
from tests.support.harness import Harness
from tests.support.refusals import expect

CONFIG = {
    "zentinel.kdl": b'listeners {\n    listener "http" {\n        address "0.0.0.0:8080"\n    }\n}\n',
    "conf/limits.yaml": b"rps: 100\n",
    "conf/upstreams.json": b'{"backend": ["10.0.0.1:80"]}',
    "certs/site.pem": b"-----BEGIN CERTIFICATE-----\n",
}


async def check_kdl(harness: Harness) -> None:
    """The project's validators: KDL syntax on top of the default JSON and YAML."""
    parsers = [
        bpb.ParserCheck(format=f)
        for f in (bpb.CONFIG_FORMAT_KDL, bpb.CONFIG_FORMAT_JSON, bpb.CONFIG_FORMAT_YAML)
    ]
    await harness.bundles.SetValidationConfig(
        bpb.SetValidationConfigRequest(project="default", config=bpb.ValidationConfig(parsers=parsers))
    )


async def count(harness: Harness) -> int:
    listed = await harness.bundles.ListBundles(bpb.ListBundlesRequest(project="default", page_size=1000))
    return len(listed.bundles)


async def test_push_validates_packs_signs_and_scores(harness: Harness) -> None:
    await check_kdl(harness)
    reply = await create(harness.bundles, CONFIG, version="v1.4.2")
    b = reply.bundle
    assert reply.created
    assert b.state == bpb.BUNDLE_STATE_VALID and b.version == "v1.4.2"
    assert b.file_count == 4 and b.total_bytes == sum(len(v) for v in CONFIG.values())
    assert [v.validator for v in b.validation] == ["kdl:*.kdl", "json:*.json", "yaml:*.yaml,*.yml"]
    assert all(v.ok for v in b.validation)
    assert b.risk.level == bpb.RISK_LEVEL_LOW and b.risk.findings[0].rule == "first-bundle"
    keys = await signing_pb2_grpc.SigningKeyServiceStub(harness.channel).ListSigningKeys(
        signing_pb2.ListSigningKeysRequest()
    )
    (key,) = keys.keys
    assert key.state == signing_pb2.SIGNING_KEY_STATE_ACTIVE and key.signing and key.algorithm == "ed25519"
    assert b.key_id == key.key_id
    VerifyKey(key.public_key).verify(CONTEXT + b.digest.encode(), b.signature)
    # The archive is what nodes download, and hashes to the digest.
    chunks = [
        m
        async for m in harness.bundles.DownloadBundle(
            bpb.DownloadBundleRequest(project="default", digest=b.digest)
        )
    ]
    import hashlib

    data = b"".join(c.chunk for c in chunks)
    assert len(data) == b.size_bytes and "sha256:" + hashlib.sha256(data).hexdigest() == b.digest
    # The assignment carries the signature to the node.
    node = await harness.register("edge-1", {"env": "prod"})
    rec = harness.open_watch(node)
    await harness.assign(b.digest, selector="env=prod")
    desired = await rec.wait_digest(b.digest)
    assert (desired.signature, desired.key_id) == (b.signature, b.key_id)
    await rec.cancel()


async def test_same_content_again_creates_nothing(harness: Harness) -> None:
    first = (await create(harness.bundles, CONFIG, version="v1")).bundle
    await harness.assign(first.digest, selector="*")
    await harness.app.hub.catch_up()
    head, rows = harness.app.hub.position, await count(harness)
    # Same files, other order, other chunking, another version label: the same bundle.
    again = await create(
        harness.bundles,
        messages=file_messages(dict(reversed(list(CONFIG.items()))), chunk=3),
        version="v2",
    )
    assert not again.created and again.bundle.digest == first.digest and again.bundle.version == "v1"
    # Through a tar stream (the upload path), files with other modes and mtimes: the same.
    tarred = await create(harness.bundles, messages=tar_messages(tar_of(CONFIG), chunk=1000))
    assert not tarred.created and tarred.bundle.digest == first.digest
    assert await harness.upload(tar_of(CONFIG)) == first.digest
    await harness.app.hub.catch_up()
    assert (harness.app.hub.position, await count(harness)) == (head, rows)


async def test_failed_validation_is_recorded_and_never_assignable(harness: Harness) -> None:
    broken = {**CONFIG, "zentinel.kdl": b'listeners {\n    listener "http" {\n'}
    # By default every .kdl file is parsed too: one that does not parse is refused.
    default = (await create(harness.bundles, {"other.kdl": b"not kdl 1.0 {\n"})).bundle
    assert default.state == bpb.BUNDLE_STATE_FAILED, default.state_reason
    assert default.state_reason.startswith("kdl:*.kdl: other.kdl:"), default.state_reason
    assert [v.validator for v in default.validation] == ["kdl:*.kdl", "json:*.json", "yaml:*.yaml,*.yml"]
    await check_kdl(harness)
    reply = await create(harness.bundles, broken, version="v-broken")
    b = reply.bundle
    assert reply.created and b.state == bpb.BUNDLE_STATE_FAILED
    assert b.state_reason.startswith("kdl:*.kdl: zentinel.kdl:2:") and not b.signature and not b.key_id
    failed = [v for v in b.validation if not v.ok]
    assert [v.validator for v in failed] == ["kdl:*.kdl"]
    node = await harness.register("edge-1")
    await harness.app.hub.catch_up()
    head = harness.app.hub.position
    await expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        harness.assign(b.digest, selector="*"),
        f"bundle {b.digest} failed validation and can never be assigned: kdl:*.kdl: zentinel.kdl:2:",
    )
    download = harness.bundles.DownloadBundle(
        bpb.DownloadBundleRequest(project="default", digest=b.digest), metadata=node.metadata
    )
    await expect(grpc.StatusCode.FAILED_PRECONDITION, download.read(), "failed validation")
    await harness.app.hub.catch_up()
    assert harness.app.hub.position == head
    # The validators change; the same content pushed again is validated again: no new row.
    await harness.bundles.SetValidationConfig(
        bpb.SetValidationConfigRequest(project="default", config=bpb.ValidationConfig())
    )
    again = await create(harness.bundles, broken)
    assert not again.created and again.bundle.digest == b.digest
    assert again.bundle.state == bpb.BUNDLE_STATE_VALID and again.bundle.key_id
    assert again.bundle.version == "v-broken"
    await harness.assign(b.digest, selector="*")


async def test_versions_lookups_and_listing(harness: Harness) -> None:
    await check_kdl(harness)
    digests = []
    for i in range(5):
        files = {"main.kdl": f"n {i}\n".encode()}
        digests.append((await create(harness.bundles, files, version=f"v1.{i}.0")).bundle.digest)
    await expect(
        grpc.StatusCode.ALREADY_EXISTS,
        create(harness.bundles, {"main.kdl": b"other\n"}, version="v1.2.0"),
        "version 'v1.2.0' is already bundle",
    )
    await create(harness.bundles, {"main.kdl": b"broken {\n"}, version="v2.0.0")
    got = await harness.bundles.GetBundle(bpb.GetBundleRequest(project="default", version="v1.3.0"))
    assert got.bundle.digest == digests[3]
    await expect(
        grpc.StatusCode.NOT_FOUND,
        harness.bundles.GetBundle(bpb.GetBundleRequest(project="default", version="v9")),
        "version",
    )
    seen, token = [], ""
    while True:
        page = await harness.bundles.ListBundles(
            bpb.ListBundlesRequest(project="default", page_size=2, page_token=token)
        )
        seen += [b.version for b in page.bundles]
        token = page.next_page_token
        if not token:
            break
    assert seen == ["v2.0.0", "v1.4.0", "v1.3.0", "v1.2.0", "v1.1.0", "v1.0.0"]
    failed = await harness.bundles.ListBundles(
        bpb.ListBundlesRequest(project="default", state=bpb.BUNDLE_STATE_FAILED)
    )
    assert [b.version for b in failed.bundles] == ["v2.0.0"]
    prefixed = await harness.bundles.ListBundles(
        bpb.ListBundlesRequest(project="default", version_prefix="v1.", state=bpb.BUNDLE_STATE_VALID)
    )
    assert len(prefixed.bundles) == 5
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        harness.bundles.ListBundles(bpb.ListBundlesRequest(project="default", page_token="%%%")),
        "page_token",
    )


async def test_diff_lists_changes_with_unified_diffs_and_risk(harness: Harness) -> None:
    old = (await create(harness.bundles, {**CONFIG, "bin/blob": b"\x00\x01"})).bundle
    new_files = {
        **CONFIG,
        "conf/limits.yaml": b"rps: 5\n",
        "conf/new.yaml": b"x: 1\n",
        "bin/blob": b"\x00\x02",
    }
    del new_files["certs/site.pem"]
    new = (await create(harness.bundles, new_files)).bundle
    assert new.risk.compared_with == old.digest and new.risk.level == bpb.RISK_LEVEL_MEDIUM
    diff = await harness.bundles.DiffBundles(
        bpb.DiffBundlesRequest(project="default", from_digest=old.digest, to_digest=new.digest)
    )
    changes = {c.path: c for c in diff.changes}
    assert set(changes) == {"bin/blob", "certs/site.pem", "conf/limits.yaml", "conf/new.yaml"}
    assert changes["certs/site.pem"].kind == bpb.FILE_CHANGE_KIND_REMOVED
    assert changes["conf/new.yaml"].kind == bpb.FILE_CHANGE_KIND_ADDED
    limits = changes["conf/limits.yaml"]
    assert limits.kind == bpb.FILE_CHANGE_KIND_MODIFIED
    assert "-rps: 100\n+rps: 5\n" in limits.unified_diff
    assert limits.unified_diff.startswith("--- a/conf/limits.yaml\n+++ b/conf/limits.yaml\n")
    assert changes["bin/blob"].binary and not changes["bin/blob"].unified_diff
    assert {f.rule for f in diff.risk.findings} >= {"certificates-changed", "files-removed"}
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        harness.bundles.DiffBundles(
            bpb.DiffBundlesRequest(project="default", from_digest="x", to_digest=new.digest)
        ),
        "from_digest",
    )


async def test_revoked_bundles_cannot_be_assigned_and_their_nodes_are_flagged(harness: Harness) -> None:
    good = (await create(harness.bundles, {"main.kdl": b"good\n"})).bundle
    bad = (await create(harness.bundles, {"main.kdl": b'leaks "secrets"\n'})).bundle
    running = await harness.register("running", {"env": "prod"})
    waiting = await harness.register("waiting", {"env": "stage"})
    rec = harness.open_watch(running)
    await harness.assign(bad.digest, nodes=[running.node_id])
    desired = await rec.wait_digest(bad.digest)
    await harness.nodes.ReportStatus(
        npb.ReportStatusRequest(
            node_id=running.node_id,
            stream_id=rec.stream_id,
            revision=desired.revision,
            digest=bad.digest,
            phase=npb.REPORT_PHASE_ACTIVE,
        ),
        metadata=running.metadata,
    )
    await harness.assign(bad.digest, selector="env=stage")
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        harness.bundles.RevokeBundle(bpb.RevokeBundleRequest(project="default", digest=bad.digest)),
        "reason",
    )
    revoked = await harness.bundles.RevokeBundle(
        bpb.RevokeBundleRequest(project="default", digest=bad.digest, reason="CVE-2026-0001")
    )
    assert revoked.bundle.state == bpb.BUNDLE_STATE_REVOKED and revoked.bundle.state_reason == "CVE-2026-0001"
    flagged = {n.node_id: n for n in revoked.nodes}
    assert set(flagged) == {running.node_id, waiting.node_id}
    assert flagged[running.node_id].running and not flagged[waiting.node_id].running
    assert flagged[running.node_id].revoke_reason == "CVE-2026-0001"
    listed = await harness.bundles.ListRevokedBundleNodes(
        bpb.ListRevokedBundleNodesRequest(project="default")
    )
    assert [n.node_id for n in listed.nodes] == sorted(flagged)
    # GetNode and ListNodes carry the flag too: runs it, or is assigned it.
    got = (await harness.nodes.GetNode(npb.GetNodeRequest(node_id=running.node_id))).node
    assert got.applied_revoked_reason == "CVE-2026-0001" == got.desired_revoked_reason
    page = await harness.nodes.ListNodes(npb.ListNodesRequest(project="default"))
    by_id = {n.id: n for n in page.nodes}
    assert by_id[waiting.node_id].desired_revoked_reason == "CVE-2026-0001"
    assert by_id[waiting.node_id].applied_revoked_reason == ""
    await harness.app.hub.catch_up()
    head = harness.app.hub.position
    await expect(grpc.StatusCode.FAILED_PRECONDITION, harness.assign(bad.digest, selector="*"), "was revoked")
    download = harness.bundles.DownloadBundle(
        bpb.DownloadBundleRequest(project="default", digest=bad.digest), metadata=running.metadata
    )
    await expect(grpc.StatusCode.FAILED_PRECONDITION, download.read(), "CVE-2026-0001")
    await harness.app.hub.catch_up()
    assert harness.app.hub.position == head
    # Moving the nodes off it clears the flags.
    await harness.assign(good.digest, nodes=[waiting.node_id])
    listed = await harness.bundles.ListRevokedBundleNodes(
        bpb.ListRevokedBundleNodesRequest(project="default")
    )
    assert [n.node_id for n in listed.nodes] == [running.node_id]
    page = await harness.nodes.ListNodes(npb.ListNodesRequest(project="default"))
    by_id = {n.id: n for n in page.nodes}
    assert by_id[waiting.node_id].desired_revoked_reason == ""
    assert by_id[running.node_id].applied_revoked_reason == "CVE-2026-0001"
    await rec.cancel()


async def test_validation_settings(make_harness: Any) -> None:
    harness: Harness = await make_harness(validator_allow=(sys.executable,))
    got = await harness.bundles.GetValidationConfig(bpb.GetValidationConfigRequest(project="default"))
    assert got.is_default and [p.format for p in got.config.parsers] == [
        bpb.CONFIG_FORMAT_KDL,
        bpb.CONFIG_FORMAT_JSON,
        bpb.CONFIG_FORMAT_YAML,
    ]

    def setting(**config: Any) -> Any:
        return harness.bundles.SetValidationConfig(
            bpb.SetValidationConfigRequest(project="default", config=bpb.ValidationConfig(**config))
        )

    await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        setting(commands=[bpb.CommandCheck(name="sh", argv=["/bin/sh", "-c", "id"])]),
        "config.commands[0].argv: program '/bin/sh' is not on this server's allow-list",
    )
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT, setting(parsers=[bpb.ParserCheck()]), "config.parsers[0].format"
    )
    await expect(grpc.StatusCode.INVALID_ARGUMENT, setting(main="/etc/passwd"), "config.main")
    script = "import sys; t = open(sys.argv[1]).read(); print('checked', len(t)); sys.exit('DENY' in t)"
    await setting(
        main="proxy.conf",
        parsers=[bpb.ParserCheck(format=bpb.CONFIG_FORMAT_ZENTINEL, paths=["*.kdl"])],
        commands=[bpb.CommandCheck(name="proxy-check", argv=[sys.executable, "-c", script, "{main}"])],
    )
    got = await harness.bundles.GetValidationConfig(bpb.GetValidationConfigRequest(project="default"))
    assert not got.is_default and got.config.commands[0].argv[-1] == "{main}"
    listener = b'listeners {\n    listener "h" {\n        address "0.0.0.0:80"\n    }\n}\n'
    ok = (await create(harness.bundles, {"proxy.conf": b"allow all;\n", "z.kdl": listener})).bundle
    assert ok.state == bpb.BUNDLE_STATE_VALID, ok.state_reason
    outputs = {v.validator: v.output for v in ok.validation}
    assert outputs["command:proxy-check"] == "checked 11"
    denied = (await create(harness.bundles, {"proxy.conf": b"DENY all;\n", "z.kdl": listener})).bundle
    assert denied.state == bpb.BUNDLE_STATE_FAILED
    assert "command:proxy-check" in denied.state_reason and "exited with code 1" in denied.state_reason
    missing_main = (await create(harness.bundles, {"z.kdl": listener})).bundle
    assert "the main file 'proxy.conf' is not in the bundle" in missing_main.state_reason


HOSTILE_FILES = {
    "dot-dot": ([bpb.CreateBundleRequest(file=bpb.FileHeader(path="../x", size_bytes=1))], "file", "'..'"),
    "absolute": (
        [bpb.CreateBundleRequest(file=bpb.FileHeader(path="/etc/x", size_bytes=0))],
        "file",
        "absolute",
    ),
    "reserved": (
        [bpb.CreateBundleRequest(file=bpb.FileHeader(path=".bundle/manifest.json", size_bytes=0))],
        "file",
        "reserved",
    ),
    "escaping symlink": (
        [bpb.CreateBundleRequest(file=bpb.FileHeader(path="l", symlink_target="../../etc/passwd"))],
        "file",
        "outside",
    ),
    "symlink chain escaping": (
        [
            *file_messages({"main.kdl": b"a 1\n"}),
            bpb.CreateBundleRequest(file=bpb.FileHeader(path="up", symlink_target=".")),
            bpb.CreateBundleRequest(file=bpb.FileHeader(path="out", symlink_target="up/..")),
        ],
        "file",
        "member 'out' is refused: symlink resolves outside the bundle",
    ),
    "more bytes than announced": (
        [
            bpb.CreateBundleRequest(file=bpb.FileHeader(path="a", size_bytes=2)),
            bpb.CreateBundleRequest(chunk=b"abc"),
        ],
        "chunk",
        "more bytes than the 2 announced",
    ),
    "fewer bytes than announced": (
        [
            bpb.CreateBundleRequest(file=bpb.FileHeader(path="a", size_bytes=5)),
            bpb.CreateBundleRequest(chunk=b"abc"),
        ],
        "chunk",
        "3 bytes received, 5 announced",
    ),
    "bytes before a file": ([bpb.CreateBundleRequest(chunk=b"abc")], "chunk", "before any file header"),
    "files then tar": (
        [
            bpb.CreateBundleRequest(file=bpb.FileHeader(path="a", size_bytes=0)),
            bpb.CreateBundleRequest(tar_chunk=b"x"),
        ],
        "tar_chunk",
        "only tar_chunk",
    ),
    "no files": ([], "file", "holds no files"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_FILES))
async def test_hostile_file_streams_record_nothing(harness: Harness, case: str) -> None:
    messages, field, why = HOSTILE_FILES[case]
    details = await expect(grpc.StatusCode.INVALID_ARGUMENT, create(harness.bundles, messages=messages), why)
    assert details.startswith(f"{field}: "), details
    assert await count(harness) == 0
    blobs = harness.app.settings.data_dir / "blobs"
    assert not any(p.is_file() for p in blobs.rglob("*"))
    staging = harness.app.settings.data_dir / "staging"
    assert not any(staging.iterdir()), "scratch trees are removed"


async def test_too_many_files_are_refused(harness: Harness) -> None:
    harness.app.bundles.limits = type(harness.app.bundles.limits)(max_members=50)
    files = {f"routes/r{i}.kdl": b"r 1\n" for i in range(51)}
    await expect(grpc.StatusCode.INVALID_ARGUMENT, create(harness.bundles, files), "more than 50 members")
    assert await count(harness) == 0


async def test_downloads_beyond_the_slots_are_told_to_retry(harness: Harness) -> None:

    # Incompressible and larger than what the transport buffers: the stream stays open.
    data = {"main.kdl": b"a 1\n", "blob.bin": os.urandom(24 * 1024 * 1024)}
    digest = (await create(harness.bundles, data)).bundle.digest
    registry = harness.app.bundles
    registry.download_slots = asyncio.Semaphore(1)
    registry.download_wait = 0.2
    request = bpb.DownloadBundleRequest(project="default", digest=digest)
    holding = harness.bundles.DownloadBundle(request)
    await holding.read()  # streaming: it holds the only slot
    refused = harness.bundles.DownloadBundle(request)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await refused.read()
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in str(e.value.details())
    assert any(k == "retry-after-ms" for k, _ in e.value.trailing_metadata() or ())
    assert isinstance(harness.app.blobs, LocalBlobStore)
    blob = harness.app.blobs.path(digest)

    def blob_open() -> bool:
        fds = Path("/proc/self/fd")
        return any(os.path.realpath(fd) == str(blob.resolve()) for fd in fds.iterdir() if fd.is_symlink())

    assert blob_open()
    # A node that goes away gives its slot and the open file back when its call ends,
    # not when a garbage collection happens to find the abandoned generators: none runs.
    gc.disable()
    try:
        holding.cancel()

        async def slot_free() -> None:
            assert not blob_open()
            chunks = [m.chunk async for m in harness.bundles.DownloadBundle(request)]
            assert sum(len(c) for c in chunks) > 0

        await eventually(slot_free, what="the slot and file of the cancelled download returned")
    finally:
        gc.enable()


async def test_receiving_beyond_the_intake_slots_is_told_to_retry(harness: Harness) -> None:
    """Staging disk is bounded: a push that finds every intake slot busy is refused with a
    retry hint instead of staging another tree."""

    registry = harness.app.bundles
    registry.intake = IntakeSlots(total=1, per_owner=1, wait=0.0)
    finish = asyncio.Event()

    async def slow_upload() -> Any:
        async def requests() -> Any:
            yield bpb.CreateBundleRequest(header=bpb.CreateBundleHeader(project="default"))
            yield bpb.CreateBundleRequest(file=bpb.FileHeader(path="main.kdl", size_bytes=4))
            yield bpb.CreateBundleRequest(chunk=b"a ")
            await finish.wait()
            yield bpb.CreateBundleRequest(chunk=b"1\n")

        return await harness.bundles.CreateBundle(requests())

    holding = asyncio.create_task(slow_upload())

    async def slot_taken() -> None:
        assert registry.intake.in_use == 1, "the slow upload has not started receiving"

    await eventually(slot_taken, what="the first upload holds the intake slot")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await create(harness.bundles, {"other.kdl": b"b 2\n"})
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    assert "being received" in str(e.value.details()) and "retry" in str(e.value.details())
    assert any(k == "retry-after-ms" for k, _ in e.value.trailing_metadata() or ())
    finish.set()
    first = await holding
    assert first.bundle.state == bpb.BUNDLE_STATE_VALID
    # The slot is free again.
    assert (await create(harness.bundles, {"other.kdl": b"b 2\n"})).created


STALLS = {
    "files": (
        [
            bpb.CreateBundleRequest(file=bpb.FileHeader(path="main.kdl", size_bytes=4)),
            bpb.CreateBundleRequest(chunk=b"a "),
        ],
        "chunk: nothing arrived for 0.3 s while waiting for the rest of file 'main.kdl' "
        "(2 of 4 bytes received)",
    ),
    "tar": (
        [bpb.CreateBundleRequest(tar_chunk=tar_of({"main.kdl": b"a 1\n"})[:700])],
        "tar_chunk: nothing arrived for 0.3 s while waiting for the next tar_chunk (700 bytes received)",
    ),
}


@pytest.mark.parametrize("shape", sorted(STALLS))
async def test_an_upload_that_stops_sending_gives_its_intake_slot_back(harness: Harness, shape: str) -> None:
    """A client that opens a push and goes quiet is cut off after the idle timeout with
    DEADLINE_EXCEEDED naming what the server waited for: nothing is recorded or left
    staged, and the slot it held takes the next push."""

    registry = harness.app.bundles
    registry.intake_deadlines = IntakeDeadlines(idle_seconds=0.3)
    registry.intake = IntakeSlots(total=1, per_owner=1, wait=0.0)
    sent, why = STALLS[shape]
    never = asyncio.Event()

    async def requests() -> Any:
        yield bpb.CreateBundleRequest(header=bpb.CreateBundleHeader(project="default"))
        for message in sent:
            yield message
        # The client stalls with the stream open (its own 60 s deadline only bounds a
        # regression: that status would carry another message).
        await never.wait()

    try:
        details = await expect(
            grpc.StatusCode.DEADLINE_EXCEEDED, harness.bundles.CreateBundle(requests(), timeout=60), why
        )
    finally:
        never.set()
    assert details.endswith("the upload was abandoned and nothing was kept"), details
    assert await count(harness) == 0
    staging = harness.app.settings.data_dir / "staging"
    assert not any(staging.iterdir()), "scratch trees are removed"
    # The only slot is free: the next push is received at once (intake_wait is 0).
    assert (await create(harness.bundles, {"other.kdl": b"b 2\n"})).created


async def test_one_caller_cannot_take_the_intake_slots_another_needs(harness: Harness) -> None:
    """Key A opens as many uploads as it may and goes quiet: a third from A is told to
    retry, naming its cap, while key B's pushes are received in the slots A cannot take."""

    from controlplane.api.identity.v1 import identity_pb2 as ipb
    from tests.support.harness import auth

    registry = harness.app.bundles
    registry.intake = IntakeSlots(total=4, per_owner=2, wait=0.0)
    key_a = await harness.api_key({"default": ipb.ROLE_OPERATOR})
    key_b = await harness.api_key({"default": ipb.ROLE_OPERATOR})
    finish = asyncio.Event()

    async def held_upload(n: int) -> Any:
        async def requests() -> Any:
            yield bpb.CreateBundleRequest(header=bpb.CreateBundleHeader(project="default"))
            yield bpb.CreateBundleRequest(file=bpb.FileHeader(path="main.kdl", size_bytes=4))
            yield bpb.CreateBundleRequest(chunk=b"a ")
            await finish.wait()
            yield bpb.CreateBundleRequest(chunk=f"{n}\n".encode())

        return await harness.bundles.CreateBundle(requests(), metadata=auth(key_a))

    holding = [asyncio.create_task(held_upload(n)) for n in (1, 2)]

    async def both_receiving() -> None:
        assert registry.intake.in_use == 2, "A's uploads have not started receiving"

    await eventually(both_receiving, what="A's two uploads hold their slots")
    try:
        details = await expect(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            create(harness.bundles, {"a3.kdl": b"a 3\n"}, metadata=auth(key_a)),
            "bundles being received, the most one caller may have at once (2 of this server's 4)",
        )
        assert details.startswith("operator:"), details
        for n in (1, 2):
            assert (await create(harness.bundles, {f"b{n}.kdl": b"b 1\n"}, metadata=auth(key_b))).created
    finally:
        finish.set()
    assert all(r.created for r in await asyncio.gather(*holding))
    assert registry.intake.in_use == 0


async def test_a_validator_cannot_alter_the_archive_that_is_stored(make_harness: Any) -> None:
    """Commands run in the received tree. The archive is packed elsewhere, and the blob
    store refuses bytes that do not hash to the digest."""
    import hashlib

    harness: Harness = await make_harness(validator_allow=(sys.executable,))
    # Where the archive sat before: beside the tree, one level up from the command's cwd.
    beside = (
        "import os, pathlib; p = pathlib.Path(os.getcwd()).parent / 'bundle.tar.zst'\n"
        "if p.exists(): p.write_bytes(b'tampered')\n"
    )
    # Searching the whole staging directory finds it anyway; the store must refuse it.
    search = (
        "import os, pathlib\n"
        "for p in pathlib.Path(os.getcwd()).parent.parent.rglob('*.tar.zst'): p.write_bytes(b'tampered')\n"
    )

    async def push_with(script: str, files: dict[str, bytes]) -> Any:
        command = bpb.CommandCheck(name="evil", argv=[sys.executable, "-c", script])
        await harness.bundles.SetValidationConfig(
            bpb.SetValidationConfigRequest(project="default", config=bpb.ValidationConfig(commands=[command]))
        )
        return create(harness.bundles, files)

    bundle = (await (await push_with(beside, {"main.kdl": b"a 1\n"}))).bundle
    assert bundle.state == bpb.BUNDLE_STATE_VALID, bundle.state_reason
    chunks = [
        m.chunk
        async for m in harness.bundles.DownloadBundle(
            bpb.DownloadBundleRequest(project="default", digest=bundle.digest)
        )
    ]
    assert "sha256:" + hashlib.sha256(b"".join(chunks)).hexdigest() == bundle.digest

    details = await expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        await push_with(search, {"main.kdl": b"a 2\n"}),
        "the packed archive changed on disk before it was stored",
    )
    assert details.startswith("config.commands: "), details
    assert await count(harness) == 1
    assert {d async for d, _ in harness.app.blobs.list()} == {bundle.digest}


async def test_a_tar_push_abandoned_mid_extraction_leaves_no_scratch_behind(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client cancels its CreateBundle while the server extracts its tar in a worker
    thread: by the time the push has given its intake slot back, the extraction has
    stopped and its scratch tree is gone (a thread left running re-created the tree
    member by member and wrote the rest of the archive, up to the size limit, until the
    next restart)."""
    extracting, ended = threading.Event(), threading.Event()
    read_tar, write = tar_intake.read_tar, tree_module.FileSink.write

    def tracked_read_tar(archive: Path, tree: tree_module.TreeBuilder) -> None:
        try:
            read_tar(archive, tree)
        finally:
            ended.set()

    def slow_write(self: tree_module.FileSink, data: bytes) -> None:
        extracting.set()
        time.sleep(0.01)
        write(self, data)

    monkeypatch.setattr(bundle_intake, "read_tar", tracked_read_tar)
    monkeypatch.setattr(tree_module.FileSink, "write", slow_write)
    members = {f"d{i % 4}/f{i}.txt": b"a" * 256 * 1024 for i in range(80)}
    pushing = asyncio.create_task(create(harness.bundles, messages=tar_messages(tar_of(members))))
    assert await asyncio.to_thread(extracting.wait, 10)
    pushing.cancel()  # the client goes away: its call is cancelled
    with pytest.raises(asyncio.CancelledError):
        await pushing
    intake = harness.app.bundles.intake

    async def slot_returned() -> None:
        assert intake.in_use == 0

    await eventually(slot_returned, what="the cancelled push's intake slot returned")
    assert ended.is_set(), "the extraction was still running when the push had given its slot back"
    assert list(harness.app.bundles.staging_dir.iterdir()) == []
