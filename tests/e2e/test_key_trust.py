"""Write access to the database alone never makes an agent trust a key
(domain/bundles/key_trust.py), tested the way an attacker would do it: a signing key row and a
signature by it inserted into the database by hand (and a bundle of their own put in the
blob directory), then the server restarted, as at any deploy.

Three real agents: one trusting the server's own `<data-dir>/trusted-keys.json` (which
every start rewrites), one that pinned the server's keys before the insert, one whose
first contact comes after it. Each refuses the planted key's signature, before and after
restarts of the server and of itself, and keeps running its bundle."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent_stub.verify import load_trusted_keys
from controlplane.api.bundle.v1 import signing_pb2, signing_pb2_grpc
from controlplane.domain.bundles.signing import Signer
from controlplane.store.schema import bundle_signatures
from tests.e2e.test_agent_verify import GOOD, Tamper, push, refused
from tests.support.archives import bundle as archive_of
from tests.support.processes import AgentProcess, ControlClient, ServerProcess

pytestmark = pytest.mark.e2e


def plant(server: ServerProcess, stranger: Signer, digests: list[str]) -> None:
    """The key row, and a signature by it on each bundle, newer than any other: the server
    hands it out with every assignment of those bundles from now on."""
    tamper = Tamper(server)
    try:
        tamper.add_signing_key(stranger)
        with tamper.engine.begin() as conn:
            for digest in digests:
                conn.execute(
                    bundle_signatures.insert().values(
                        project="default",
                        digest=digest,
                        key_id=stranger.key_id,
                        signature=stranger.sign(digest),
                        created_at=datetime.now(UTC) + timedelta(days=1),
                    )
                )
    finally:
        tamper.close()


def agent(server: ServerProcess, tmp_path: Path, name: str, trusts_file: bool) -> AgentProcess:
    return AgentProcess(
        server.address,
        server.token,
        tmp_path / f"agent-{name}",
        name,
        {"env": "prod"},
        trust_server_keys=trusts_file,
    )


async def test_a_key_planted_in_the_database_is_refused_by_every_agent(
    server: ServerProcess, control: ControlClient, tmp_path: Path
) -> None:
    with_file = agent(server, tmp_path, "with-file", trusts_file=True)
    pinned_before = agent(server, tmp_path, "pinned-before", trusts_file=False)
    agents = [with_file, pinned_before]
    try:
        for a in agents:
            a.start()
            await a.wait_registered()
        good = await push(control, GOOD)
        await control.assign(good.digest, selector="env=prod")
        for a in agents:
            await a.wait_current(good.digest)

        # The attack: a key row and signatures by it (on a bundle the pipeline made, and on
        # one of the attacker's own, archive and row put in place by hand), then a restart.
        stranger = Signer.generate()
        legit = await push(control, {"main.kdl": b'listen "8443"\n'})
        tamper = Tamper(server)
        try:
            own = tamper.add_bundle(archive_of({"main.kdl": b'listen "6666"\n'}))
        finally:
            tamper.close()
        plant(server, stranger, [legit.digest, own])
        await server.restart()
        assert stranger.key_id not in load_trusted_keys(server.trusted_keys)
        listed = await signing_pb2_grpc.SigningKeyServiceStub(control.channel).ListSigningKeys(
            signing_pb2.ListSigningKeysRequest(), metadata=control.metadata, wait_for_ready=True, timeout=30
        )
        assert stranger.key_id not in {k.key_id for k in listed.keys}

        pinned_after = agent(server, tmp_path, "pinned-after", trusts_file=False)
        pinned_after.start()
        await pinned_after.wait_registered()
        agents.append(pinned_after)
        await control.assign(good.digest, nodes=[pinned_after.node_id])
        await pinned_after.wait_current(good.digest)
        pins = load_trusted_keys(pinned_after.state_dir / "trusted-keys.json")
        assert stranger.key_id not in pins

        for digest in (legit.digest, own):
            revision = await control.assign(digest, selector="env=prod")
            for a in agents:
                await refused(control, a, digest, revision, f"signed by unknown key {stranger.key_id}")

        # Everyone restarts; the planted key is still refused, the good bundle still runs.
        await server.restart()
        assert stranger.key_id not in load_trusted_keys(server.trusted_keys)
        for a in agents:
            await a.stop()
            a.start()
        revision = await control.assign(own, selector="env=prod")
        for a in agents:
            await refused(control, a, own, revision, f"signed by unknown key {stranger.key_id}")
            assert a.current_digest() == good.digest
    finally:
        for a in agents:
            await a.close()
