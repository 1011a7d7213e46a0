"""Signing keys: first start, rotation to a new key, retirement re-signing what nodes get."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane.api.bundle.v1 import bundle_pb2 as bpb
from controlplane.api.bundle.v1 import signing_pb2, signing_pb2_grpc
from controlplane.domain.bundles.keys import KeyDirectory
from controlplane.domain.bundles.signing import Signer, verify
from controlplane.domain.kernel.clock import utcnow
from controlplane.domain.kernel.errors import FailedPrecondition
from tests.support.bundles import create
from tests.support.harness import Harness


def keys_stub(harness: Harness) -> signing_pb2_grpc.SigningKeyServiceStub:
    return signing_pb2_grpc.SigningKeyServiceStub(harness.channel)


async def list_keys(harness: Harness) -> dict[str, signing_pb2.SigningKey]:
    reply = await keys_stub(harness).ListSigningKeys(signing_pb2.ListSigningKeysRequest(project="default"))
    return {k.key_id: k for k in reply.keys}


async def restart(harness: Harness, make_harness: Any, **settings: Any) -> Harness:
    await harness.close()
    await harness.app.stop()
    new: Harness = await make_harness(**settings)
    return new


async def test_first_start_makes_a_private_key_file(harness: Harness) -> None:
    path = harness.app.settings.data_dir / "signing-key"
    assert path.stat().st_mode & 0o777 == 0o600
    signer = Signer.from_seed(bytes.fromhex(path.read_text().strip()))
    keys = await list_keys(harness)
    assert list(keys) == [signer.key_id] and keys[signer.key_id].public_key == signer.public_key
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await keys_stub(harness).RetireSigningKey(
            signing_pb2.RetireSigningKeyRequest(signing_key_id=signer.key_id)
        )
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "this server signs with" in str(
        e.value.details()
    )
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await keys_stub(harness).RetireSigningKey(
            signing_pb2.RetireSigningKeyRequest(signing_key_id="feedface")
        )
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "signing_key_id" in str(e.value.details())


async def test_rotation_signs_with_the_new_key_and_retiring_the_old_resigns_assignments(
    harness: Harness, make_harness: Any
) -> None:
    old_id = harness.app.signing_keys.signer.key_id
    first = (await create(harness.bundles, {"main.kdl": b"v 1\n"})).bundle
    node = await harness.register("edge-1", {"env": "prod"})
    await harness.assign(first.digest, selector="env=prod")
    assert first.key_id == old_id

    new_key = Signer.generate()
    # The old key (made on first start, in the data dir) and the new one endorse each
    # other, so both are provably trusted during the rotation (domain/bundles/key_trust.py).
    old_file = harness.app.settings.data_dir / "signing-key"
    harness = await restart(
        harness, make_harness, signing_key=new_key.seed.hex(), cross_sign_key_file=old_file
    )
    keys = await list_keys(harness)
    assert set(keys) == {old_id, new_key.key_id}
    assert keys[new_key.key_id].signing and not keys[old_id].signing
    assert all(k.state == signing_pb2.SIGNING_KEY_STATE_ACTIVE for k in keys.values())
    # Every valid bundle got a signature by the new key at start; it is the one delivered now.
    got = (
        await harness.bundles.GetBundle(bpb.GetBundleRequest(project="default", digest=first.digest))
    ).bundle
    assert got.key_id == new_key.key_id and verify(new_key.public_key, first.digest, got.signature)
    second = (await create(harness.bundles, {"main.kdl": b"v 2\n"})).bundle
    assert second.key_id == new_key.key_id

    # The node's current assignment still carries the old signature until the old key retires.
    rec = harness.open_watch(node)
    desired = await rec.wait_digest(first.digest)
    assert desired.key_id == old_id
    await harness.app.hub.catch_up()
    head = harness.app.hub.position
    retired = await keys_stub(harness).RetireSigningKey(
        signing_pb2.RetireSigningKeyRequest(signing_key_id=old_id)
    )
    assert retired.key.state == signing_pb2.SIGNING_KEY_STATE_RETIRED and retired.key.HasField("retired_at")
    await rec.wait_for(
        lambda r: any(d.key_id == new_key.key_id for d in r.of("desired")), what="re-signed assignment"
    )
    resent = rec.of("desired")[-1]
    assert resent.digest == first.digest and resent.revision > head
    assert verify(new_key.public_key, first.digest, resent.signature)
    # Retiring again changes nothing.
    await keys_stub(harness).RetireSigningKey(signing_pb2.RetireSigningKeyRequest(signing_key_id=old_id))
    await harness.app.hub.catch_up()
    assert harness.app.hub.position == resent.revision
    await rec.cancel()

    # A server configured with the retired key refuses to start: this is its first step.
    old_seed = (harness.app.settings.data_dir / "signing-key").read_text().strip()
    stale = KeyDirectory(harness.app.store, utcnow, Signer.from_seed(bytes.fromhex(old_seed)), lambda: None)
    with pytest.raises(FailedPrecondition, match=f"signing key {old_id} was retired"):
        await stale.register()


async def test_the_signing_key_comes_from_a_flag_a_file_or_the_environment(
    make_harness: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--signing-key-file, CONTROLPLANE_SIGNING_KEY and CONTROLPLANE_SIGNING_KEY_FILE, as
    `serve` parses them, each make the server sign with that key (and none is generated)."""
    from controlplane.cli.bundle_options import bundle_settings
    from controlplane.cli.serve import serve

    by_flag, by_env, by_env_file = Signer.generate(), Signer.generate(), Signer.generate()
    flag_file, env_file = tmp_path / "flag.key", tmp_path / "env.key"
    flag_file.write_text(by_flag.seed.hex() + "\n")
    env_file.write_text(by_env_file.seed.hex() + "\n")
    for name in ("CONTROLPLANE_SIGNING_KEY", "CONTROLPLANE_SIGNING_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)

    def parsed(*argv: str) -> dict[str, Any]:
        options = bundle_settings(dict(serve.make_context("serve", list(argv)).params))
        return {k: v for k, v in options.items() if k in ("signing_key", "signing_key_file")}

    cases = [(parsed("--signing-key-file", str(flag_file)), by_flag)]
    monkeypatch.setenv("CONTROLPLANE_SIGNING_KEY", by_env.seed.hex())
    cases.append((parsed(), by_env))
    monkeypatch.delenv("CONTROLPLANE_SIGNING_KEY")
    monkeypatch.setenv("CONTROLPLANE_SIGNING_KEY_FILE", str(env_file))
    cases.append((parsed(), by_env_file))
    assert cases[0][0] == {"signing_key": "", "signing_key_file": flag_file}
    assert cases[1][0] == {"signing_key": by_env.seed.hex(), "signing_key_file": None}
    assert cases[2][0] == {"signing_key": "", "signing_key_file": env_file}

    harness: Harness | None = None
    for i, (settings, expected) in enumerate(cases):
        if harness is None:
            harness = await make_harness(**settings)
        else:
            harness = await restart(harness, make_harness, **settings)
        keys = await list_keys(harness)
        assert [k for k, v in keys.items() if v.signing] == [expected.key_id]
        assert keys[expected.key_id].public_key == expected.public_key
        bundle = (await create(harness.bundles, {"main.kdl": f"v {i}\n".encode()})).bundle
        assert bundle.key_id == expected.key_id and verify(
            expected.public_key, bundle.digest, bundle.signature
        )
    assert not (tmp_path / "data" / "signing-key").exists(), "a configured key means none is generated"
