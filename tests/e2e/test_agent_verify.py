"""Nodes run only what the control plane built and signed: real server, real agents.

Each tampering is injected the way an attacker with write access to the database or
the blob storage (but not, except where said, to the signing key) would: straight into
the server's SQLite file and blob directory while it runs. The agent must refuse each,
keep serving its current bundle, and the operator must see why on GetNode.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import tarfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import zstandard
from sqlalchemy import create_engine, select, update

from agent_stub.verify import load_trusted_keys
from controlplane.api.bundle.v1 import signing_pb2, signing_pb2_grpc
from controlplane.api.node.v1 import node_pb2
from controlplane.domain.bundles.signing import Signer
from controlplane.store.schema import bundles, desired_state_log, revision_counter, signing_keys
from tests.e2e.conftest import AgentFactory
from tests.support.archives import member, tar_zst
from tests.support.bundles import create
from tests.support.processes import FAST_AGENT_ARGS, AgentProcess, ControlClient, ServerProcess

pytestmark = pytest.mark.e2e

GOOD = {"main.kdl": b'listen "8080"\n', "conf/site.yaml": b"name: good\n"}


class Tamper:
    """Direct access to a running server's database and blob directory."""

    def __init__(self, server: ServerProcess):
        self.data_dir = server.data_dir
        self.engine = create_engine(
            f"sqlite:///{server.data_dir / 'controlplane.db'}", connect_args={"timeout": 30}
        )

    def close(self) -> None:
        self.engine.dispose()

    def signer(self) -> Signer:
        """The server's own key (generated on first start in the data directory)."""
        return Signer.from_seed(bytes.fromhex((self.data_dir / "signing-key").read_text().strip()))

    def blob(self, digest: str) -> Path:
        hexdigest = digest.removeprefix("sha256:")
        return self.data_dir / "blobs" / "sha256" / hexdigest[:2] / hexdigest

    def flip_blob_byte(self, digest: str) -> None:
        path = self.blob(digest)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))

    def add_bundle(self, archive: bytes) -> str:
        """A bundle row and its blob, as if the pipeline had made them."""
        digest = "sha256:" + hashlib.sha256(archive).hexdigest()
        path = self.blob(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(archive)
        with self.engine.begin() as conn:
            conn.execute(
                bundles.insert().values(
                    project="default",
                    digest=digest,
                    size_bytes=len(archive),
                    file_count=1,
                    created_at=datetime.now(UTC),
                    state="valid",
                    state_reason="",
                    total_bytes=0,
                    manifest_digest="",
                    risk="low",
                    risk_compared_with="",
                )
            )
        return digest

    def head(self) -> int:
        with self.engine.begin() as conn:
            return int(conn.execute(select(revision_counter.c.value)).scalar_one())

    def add_signing_key(self, signer: Signer) -> None:
        """A key row written behind the server's back: the server lists it as active."""
        with self.engine.begin() as conn:
            conn.execute(
                signing_keys.insert().values(
                    key_id=signer.key_id,
                    public_key=signer.public_key,
                    state="active",
                    created_at=datetime.now(UTC),
                    retired_at=None,
                )
            )

    def break_key_listing(self) -> None:
        """A key row in a state the server cannot read: ListSigningKeys fails (INTERNAL)."""
        with self.engine.begin() as conn:
            conn.execute(
                signing_keys.insert().values(
                    key_id="f" * 16,
                    public_key=Signer.generate().public_key,
                    state="unreadable",
                    created_at=datetime.now(UTC),
                    retired_at=None,
                )
            )

    def assign(self, node_id: str, digest: str, signature: bytes | None, key_id: str) -> int:
        """An assignment written behind the server's back; its hub sweeps it up."""
        size = self.blob(digest).stat().st_size if self.blob(digest).exists() else 0
        with self.engine.begin() as conn:
            conn.execute(update(revision_counter).values(value=revision_counter.c.value + 1))
            revision = int(conn.execute(select(revision_counter.c.value)).scalar_one())
            conn.execute(
                desired_state_log.insert().values(
                    key=f"node:{node_id}",
                    revision=revision,
                    project="default",
                    kind="assign",
                    digest=digest,
                    pinned=False,
                    traffic_weight=100,
                    size_bytes=size,
                    annotations={},
                    labels=None,
                    written_at=time.time(),
                    signature=signature,
                    key_id=key_id,
                )
            )
        return revision


async def trusted_keys_file(control: ControlClient, path: Path, retire: frozenset[str] = frozenset()) -> Path:
    reply = await signing_pb2_grpc.SigningKeyServiceStub(control.channel).ListSigningKeys(
        signing_pb2.ListSigningKeysRequest(), metadata=control.metadata, timeout=10
    )
    keys = [
        {
            "key_id": k.key_id,
            "public_key": base64.b64encode(k.public_key).decode(),
            "state": "retired" if k.key_id in retire else "active",
        }
        for k in reply.keys
    ]
    await asyncio.to_thread(path.write_text, json.dumps({"keys": keys}))
    return path


async def push(control: ControlClient, files: dict[str, bytes]) -> Any:
    reply = await create(control.bundles, files, metadata=control.metadata, wait_for_ready=True, timeout=30)
    return reply.bundle


async def refused(control: ControlClient, agent: AgentProcess, digest: str, revision: int, why: str) -> str:
    """Wait for the node's FAILED report of `digest` at `revision` (or a later revision
    delivering it), then check that GetNode shows that report's reason.

    Only that report will do: `failed_*` name the last bundle the node rejected, so while
    the node works on the next revision of a bundle it refused just before (DOWNLOADED
    first, FAILED after the manifest check) they still hold the earlier reason. An agent
    that accepts the bundle reports ACTIVE instead, and this times out."""
    node = await control.wait_node(
        agent.node_id,
        lambda n: (
            n.last_report.phase == node_pb2.REPORT_PHASE_FAILED
            and n.last_report.digest == digest
            and n.last_report.revision >= revision
        ),
        what=f"NACK of {digest} at {revision}",
    )
    assert node.failed_digest == digest, node
    assert node.failed_error == node.last_report.error, node
    assert why in node.failed_error, node.failed_error
    return str(node.failed_error)


async def test_agent_refuses_every_tampering_and_keeps_its_bundle(
    server: ServerProcess, control: ControlClient, spawn_agent: AgentFactory, tmp_path: Path
) -> None:
    keys = await trusted_keys_file(control, tmp_path / "trusted-keys.json")
    agent = spawn_agent("edge-1", {"env": "prod"}, extra_args=(*FAST_AGENT_ARGS, "--trusted-keys", str(keys)))
    good = await push(control, GOOD)
    await control.assign(good.digest, selector="env=prod")
    await agent.wait_current(good.digest)
    # The bundle directory holds the operator's files only: the manifest was checked and dropped.
    assert agent.current_files() == GOOD
    node_id = await agent.wait_registered()
    tamper = Tamper(server)
    try:
        signer = tamper.signer()
        target = await push(control, {"main.kdl": b'listen "9090"\n'})
        sig = target.signature

        # A signature with one bit flipped.
        flipped = bytes([sig[0] ^ 0x01]) + sig[1:]
        rev = tamper.assign(node_id, target.digest, flipped, target.key_id)
        await refused(control, agent, target.digest, rev, f"signature by key {target.key_id} does not verify")

        # No signature at all.
        rev = tamper.assign(node_id, target.digest, None, "")
        await refused(control, agent, target.digest, rev, "is unsigned")

        # A valid signature by a key the node never trusted.
        stranger = Signer.generate()
        rev = tamper.assign(node_id, target.digest, stranger.sign(target.digest), stranger.key_id)
        await refused(control, agent, target.digest, rev, f"signed by unknown key {stranger.key_id}")

        # A flipped byte in the stored archive: correctly signed digest, wrong bytes. The
        # server notices as it streams and withholds the last chunk: DATA_LOSS, a NACK.
        victim = await push(control, {"main.kdl": b'listen "7070"\n'})
        tamper.flip_blob_byte(victim.digest)
        rev = await control.assign(victim.digest, nodes=[node_id])
        await refused(control, agent, victim.digest, rev, "DATA_LOSS")

        # A flipped byte in the manifest. Repacked, the archive has a new digest, and the
        # old signature does not cover it...
        manifest_tampered = _flip_manifest_byte(tamper.blob(target.digest).read_bytes())
        forged = tamper.add_bundle(manifest_tampered)
        rev = tamper.assign(node_id, forged, sig, target.key_id)
        await refused(control, agent, forged, rev, "does not verify")
        # ...and even signed with the real key (a compromised packer), the manifest no
        # longer matches the files.
        rev = tamper.assign(node_id, forged, signer.sign(forged), signer.key_id)
        error = await refused(control, agent, forged, rev, "manifest check failed: 'main.kdl' has sha256")
        assert "the manifest says" in error
    finally:
        tamper.close()
    assert agent.current_digest() == good.digest
    assert agent.current_files() == GOOD
    bad_hex = {d.removeprefix("sha256:") for d in (target.digest, victim.digest, forged)}
    assert not bad_hex & set(agent.bundle_dirs())
    # Still healthy: a good bundle after all that is applied.
    better = await push(control, {**GOOD, "conf/site.yaml": b"name: better\n"})
    await control.assign(better.digest, nodes=[node_id])
    await agent.wait_current(better.digest)


async def test_a_key_the_node_holds_as_retired_is_refused(
    server: ServerProcess, control: ControlClient, spawn_agent: AgentFactory, tmp_path: Path
) -> None:
    server_key = Tamper(server)
    key_id = server_key.signer().key_id
    server_key.close()
    keys = await trusted_keys_file(control, tmp_path / "keys.json", retire=frozenset({key_id}))
    agent = spawn_agent("edge-1", {"env": "prod"}, extra_args=(*FAST_AGENT_ARGS, "--trusted-keys", str(keys)))
    node_id = await agent.wait_registered()
    bundle = await push(control, GOOD)
    rev = await control.assign(bundle.digest, nodes=[node_id])
    await refused(control, agent, bundle.digest, rev, f"signed by retired key {key_id}")
    assert agent.current_digest() == ""


async def test_without_a_keys_file_a_key_added_to_the_database_later_is_not_trusted(
    server: ServerProcess, control: ControlClient, tmp_path: Path
) -> None:
    """Trust on first use: the keys listed at first contact are pinned in the state dir; a
    key that anyone able to write the database adds afterwards is refused."""
    agent = AgentProcess(
        server.address,
        server.token,
        tmp_path / "agent-edge-1",
        "edge-1",
        {"env": "prod"},
        trust_server_keys=False,
    )
    agent.start()
    try:
        assert "--trusted-keys" not in agent.args()
        node_id = await agent.wait_registered()
        good = await push(control, GOOD)
        await control.assign(good.digest, nodes=[node_id])
        await agent.wait_current(good.digest)
        pins = json.loads((agent.state_dir / "trusted-keys.json").read_text())
        assert [k["key_id"] for k in pins["keys"]] == [good.key_id]
        tamper = Tamper(server)
        try:
            stranger = Signer.generate()
            tamper.add_signing_key(stranger)
            listed = await signing_pb2_grpc.SigningKeyServiceStub(control.channel).ListSigningKeys(
                signing_pb2.ListSigningKeysRequest(), metadata=control.metadata, timeout=10
            )
            assert stranger.key_id not in {k.key_id for k in listed.keys}, "the server lists a planted key"
            other = await push(control, {"main.kdl": b'listen "1"\n'})
            rev = tamper.assign(node_id, other.digest, stranger.sign(other.digest), stranger.key_id)
            error = await refused(
                control, agent, other.digest, rev, f"signed by unknown key {stranger.key_id}"
            )
            assert "pinned at first contact" in error and "trusted-keys.json" in error
        finally:
            tamper.close()
        assert agent.current_digest() == good.digest
    finally:
        await agent.close()


async def test_the_server_writes_its_keys_and_prints_an_agent_command_that_trusts_them(
    server: ServerProcess, control: ControlClient
) -> None:
    listed = await signing_pb2_grpc.SigningKeyServiceStub(control.channel).ListSigningKeys(
        signing_pb2.ListSigningKeysRequest(), metadata=control.metadata, timeout=10
    )
    written = load_trusted_keys(server.trusted_keys)
    assert {k: v.public_key for k, v in written.items()} == {k.key_id: k.public_key for k in listed.keys}
    command = next(line for line in server.log().splitlines() if "agent-stub --server" in line)
    assert command.strip().endswith(f"--trusted-keys {server.trusted_keys}"), command


async def test_after_rotation_a_bundle_signed_by_the_retired_key_is_refused(
    server: ServerProcess, control: ControlClient, spawn_agent: AgentFactory, tmp_path: Path
) -> None:
    """Rotate to a new key, retire the old one: a real agent trusting the server's keys
    file refuses anything signed by the old key, says why on GetNode, keeps its bundle,
    and runs what the new key signs. Restarted while ListSigningKeys fails, and with the
    server's file still listing the old key as active, it still refuses the old key."""
    agent = spawn_agent("edge-1", {"env": "prod"})
    node_id = await agent.wait_registered()
    first = await push(control, GOOD)
    await control.assign(first.digest, nodes=[node_id])
    await agent.wait_current(first.digest)
    tamper = Tamper(server)
    old = tamper.signer()
    tamper.close()
    assert first.key_id == old.key_id

    new = Signer.generate()
    new_file = tmp_path / "new.key"
    new_file.write_text(new.seed.hex() + "\n")
    # The old key (in the data dir) cross-signs with the new one: both stay provably
    # trusted until the old one is retired (domain/bundles/key_trust.py).
    old_file = server.data_dir / "signing-key"
    server.extra_args = (
        *server.extra_args,
        "--signing-key-file",
        str(new_file),
        "--cross-sign-key-file",
        str(old_file),
    )
    await server.restart()
    assert set(load_trusted_keys(server.trusted_keys)) == {old.key_id, new.key_id}
    stub = signing_pb2_grpc.SigningKeyServiceStub(control.channel)
    await stub.RetireSigningKey(
        signing_pb2.RetireSigningKeyRequest(signing_key_id=old.key_id),
        metadata=control.metadata,
        wait_for_ready=True,
        timeout=30,
    )
    # Its assignment was written again with the new key's signature (the head revision
    # now); the node, which read the new key from the rewritten file, acknowledges it.
    tamper = Tamper(server)
    resigned = tamper.head()
    tamper.close()
    await control.wait_node(
        node_id,
        lambda n: n.last_report.revision >= resigned and n.applied_digest == first.digest,
        what="the node acknowledges the re-signed assignment",
    )
    assert not (await control.get_node(node_id)).failed_digest

    second = await push(control, {"main.kdl": b'listen "9443"\n'})
    assert second.key_id == new.key_id
    tamper = Tamper(server)
    try:
        # A valid signature by the old key (an old assignment replayed, a leaked key).
        rev = tamper.assign(node_id, second.digest, old.sign(second.digest), old.key_id)
        error = await refused(control, agent, second.digest, rev, f"signed by retired key {old.key_id}")
        assert "it is trusted no more" in error
    finally:
        tamper.close()
    assert agent.current_digest() == first.digest
    assert agent.current_files() == GOOD
    # The same bundle with the new key's signature is run.
    await control.assign(second.digest, nodes=[node_id])
    await agent.wait_current(second.digest)

    # The server rewrites its trusted-keys file only at `serve` start: it still says the
    # old key is active. Restart the agent while the listing fails.
    assert not load_trusted_keys(server.trusted_keys)[old.key_id].retired
    third = await push(control, {"main.kdl": b'listen "9444"\n'})
    await agent.stop()
    tamper = Tamper(server)
    try:
        tamper.break_key_listing()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            request = signing_pb2.ListSigningKeysRequest()
            await stub.ListSigningKeys(request, metadata=control.metadata, timeout=10)
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        agent.start()
        rev = tamper.assign(node_id, third.digest, old.sign(third.digest), old.key_id)
        await refused(control, agent, third.digest, rev, f"signed by retired key {old.key_id}")
    finally:
        tamper.close()
    assert agent.current_digest() == second.digest
    assert "retired-keys.json" in {p.name for p in agent.state_dir.iterdir()}


HOSTILE = {
    "dot-dot": ([(member("../../escape", b"x"), b"x")], "'..' in path"),
    "absolute symlink": (
        [
            (member("main.kdl", b"x"), b"x"),
            (member("link", kind=tarfile.SYMTYPE, linkname="/etc/shadow"), b""),
        ],
        "symlink to absolute path",
    ),
    "device file": (
        [(member("main.kdl", b"x"), b"x"), (member("dev", kind=tarfile.CHRTYPE), b"")],
        "device file",
    ),
    "decompression bomb": ([(member("zeros", b"\0" * (32 << 20)), b"\0" * (32 << 20))], "decompression bomb"),
}


async def test_hostile_archives_are_refused_by_the_agent_itself(
    server: ServerProcess, control: ControlClient, spawn_agent: AgentFactory, tmp_path: Path
) -> None:
    """The server never builds these; signed with its key and slipped into storage, the
    agent's own unpacking still refuses them."""
    args = (*FAST_AGENT_ARGS, "--max-unpacked-bytes", str(8 << 20))
    agent = spawn_agent("edge-1", {"env": "prod"}, extra_args=args)
    node_id = await agent.wait_registered()
    good = await push(control, GOOD)
    await control.assign(good.digest, nodes=[node_id])
    await agent.wait_current(good.digest)
    tamper = Tamper(server)
    signer = tamper.signer()
    try:
        cases = {name: (tar_zst(entries), why) for name, (entries, why) in HOSTILE.items()}
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tar:
            for i in range(100_000):
                tar.addfile(member(f"f{i}", b""), io.BytesIO(b""))
        cases["100,000 tiny files"] = (
            zstandard.ZstdCompressor().compress(raw.getvalue()),
            "more than 10000 members",
        )
        for name, (archive, why) in cases.items():
            digest = tamper.add_bundle(archive)
            rev = tamper.assign(node_id, digest, signer.sign(digest), signer.key_id)
            error = await refused(control, agent, digest, rev, why)
            assert "unsafe or invalid archive" in error, (name, error)
    finally:
        tamper.close()
    assert agent.current_digest() == good.digest
    assert agent.current_files() == GOOD
    assert not (tmp_path / "escape").exists()


def _flip_manifest_byte(archive: bytes) -> bytes:
    """The same archive with one hex digit of the manifest's first sha256 changed."""
    plain = zstandard.ZstdDecompressor().decompress(archive, max_output_size=64 << 20)
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(plain), mode="r") as src,
        tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst,
    ):
        for m in src.getmembers():
            f = src.extractfile(m) if m.isfile() else None
            data = f.read() if f is not None else b""
            if m.name == ".bundle/manifest.json":
                at = data.index(b'"sha256":"') + len(b'"sha256":"')
                data = data[:at] + (b"0" if data[at : at + 1] != b"0" else b"1") + data[at + 1 :]
            dst.addfile(m, io.BytesIO(data) if m.isfile() else None)
    return zstandard.ZstdCompressor().compress(out.getvalue())
