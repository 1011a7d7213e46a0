"""Signatures: what is signed, key ids, and the agent's key ring refusing each forgery."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from agent_stub.errors import ApplyFailed, TransientFailure
from agent_stub.state import CorruptState
from agent_stub.verify import PIN_FILE, RETIRED_FILE, BundleVerifier, KeyRing, TrustedKey, load_trusted_keys
from controlplane.domain.bundles.signing import CONTEXT, Signer, key_id_of, parse_seed, signed_message, verify

DIGEST = "sha256:" + "ab" * 32


def test_the_signed_message_is_the_prefixed_digest() -> None:
    signer = Signer.generate()
    signature = signer.sign(DIGEST)
    assert signed_message(DIGEST) == b"controlplane.bundle.v1\x00" + DIGEST.encode()
    # Anyone with the public key checks it with plain Ed25519 over those bytes.
    from nacl.signing import VerifyKey

    VerifyKey(signer.public_key).verify(CONTEXT + DIGEST.encode(), signature)
    assert verify(signer.public_key, DIGEST, signature)
    assert not verify(signer.public_key, "sha256:" + "cd" * 32, signature)
    assert not verify(Signer.generate().public_key, DIGEST, signature)
    # A signature of the bare digest (no domain separation) is not ours.
    bare = bytes(SigningKey(signer.seed).sign(DIGEST.encode()).signature)
    assert not verify(signer.public_key, DIGEST, bare)


def test_key_ids_and_seeds() -> None:
    signer = Signer.from_seed(b"\x01" * 32)
    assert signer.key_id == hashlib.sha256(signer.public_key).hexdigest()[:16] == key_id_of(signer.public_key)
    assert Signer.from_seed(parse_seed((b"\x01" * 32).hex() + "\n")).key_id == signer.key_id
    with pytest.raises(ValueError, match="64 hex digits"):
        parse_seed("not hex")
    with pytest.raises(ValueError, match="32 bytes"):
        parse_seed("ab" * 16)


def trusted(*signers: Signer, retired: tuple[Signer, ...] = ()) -> dict[str, TrustedKey]:
    return {s.key_id: TrustedKey(s.key_id, s.public_key, s in retired) for s in signers}


def ring_of(*signers: Signer, retired: tuple[Signer, ...] = ()) -> KeyRing:
    return KeyRing(trusted(*signers, retired=retired))


def keys_file(path: Path, *signers: Signer, retired: tuple[Signer, ...] = ()) -> Path:
    body = [
        {
            "key_id": s.key_id,
            "public_key": base64.b64encode(s.public_key).decode(),
            "state": "RETIRED" if s in retired else "ACTIVE",
        }
        for s in signers
    ]
    path.write_text(json.dumps({"keys": body}))
    return path


def test_the_ring_refuses_every_kind_of_bad_signature() -> None:
    old, new, stranger = Signer.generate(), Signer.generate(), Signer.generate()
    ring = ring_of(old, new, retired=(old,))
    ring.check(DIGEST, new.sign(DIGEST), new.key_id)
    cases = [
        (b"", "", "is unsigned"),
        (new.sign(DIGEST), "", "is unsigned"),
        (stranger.sign(DIGEST), stranger.key_id, f"signed by unknown key {stranger.key_id}"),
        (old.sign(DIGEST), old.key_id, f"signed by retired key {old.key_id}"),
        (bytes([new.sign(DIGEST)[0] ^ 1]) + new.sign(DIGEST)[1:], new.key_id, "does not verify"),
        (new.sign("sha256:" + "00" * 32), new.key_id, "does not verify"),
        (stranger.sign(DIGEST), new.key_id, "does not verify"),
    ]
    for signature, key_id, why in cases:
        with pytest.raises(ApplyFailed, match=why):
            ring.check(DIGEST, signature, key_id)


def test_the_server_can_retire_keys_but_not_add_them_to_a_pinned_ring() -> None:
    mine, theirs = Signer.generate(), Signer.generate()
    ring = ring_of(mine)
    ring.merge_server(
        [TrustedKey(theirs.key_id, theirs.public_key), TrustedKey(mine.key_id, mine.public_key, True)]
    )
    assert set(ring.keys) == {mine.key_id}
    with pytest.raises(ApplyFailed, match="retired"):
        ring.check(DIGEST, mine.sign(DIGEST), mine.key_id)
    # A later listing cannot bring a retired key back.
    ring.merge_server([TrustedKey(mine.key_id, mine.public_key, False)])
    assert ring.keys[mine.key_id].retired


def test_without_a_file_the_first_listing_is_pinned_and_later_keys_are_not_trusted(tmp_path: Path) -> None:
    first, second, added = Signer.generate(), Signer.generate(), Signer.generate()
    ring = KeyRing.pinned_in(tmp_path, fsync=False)
    assert ring.keys == {}
    ring.merge_server(list(trusted(first, second).values()))
    ring.check(DIGEST, first.sign(DIGEST), first.key_id)
    assert set(load_trusted_keys(tmp_path / PIN_FILE)) == {first.key_id, second.key_id}
    # A key the control plane lists later (a database writer added it) is not trusted.
    ring.merge_server(list(trusted(first, second, added).values()))
    with pytest.raises(ApplyFailed, match=f"signed by unknown key {added.key_id}") as e:
        ring.check(DIGEST, added.sign(DIGEST), added.key_id)
    assert f"pinned at first contact in {tmp_path / PIN_FILE}" in str(e.value)
    # A retirement is honoured, written down, and survives a restart.
    ring.merge_server(list(trusted(first, second, retired=(first,)).values()))
    with pytest.raises(ApplyFailed, match="retired"):
        ring.check(DIGEST, first.sign(DIGEST), first.key_id)
    again = KeyRing.pinned_in(tmp_path, fsync=False)
    again.merge_server(list(trusted(first, second, added).values()))
    assert set(again.keys) == {first.key_id, second.key_id} and again.keys[first.key_id].retired
    again.check(DIGEST, second.sign(DIGEST), second.key_id)


def test_the_operators_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    old, new = Signer.generate(), Signer.generate()
    path = keys_file(tmp_path / "keys.json", old)
    ring = KeyRing.from_file(path)
    with pytest.raises(ApplyFailed, match=f"unknown key {new.key_id}"):
        ring.check(DIGEST, new.sign(DIGEST), new.key_id)
    # Rotation: the operator adds the new key to the file; no restart.
    keys_file(path, old, new)
    ring.reload()
    ring.check(DIGEST, new.sign(DIGEST), new.key_id)
    # The server lists `new` as retired: a file that still says active does not undo it.
    ring.merge_server(list(trusted(old, new, retired=(new,)).values()))
    keys_file(path, old, new, Signer.generate())
    ring.reload()
    with pytest.raises(ApplyFailed, match="retired"):
        ring.check(DIGEST, new.sign(DIGEST), new.key_id)


async def test_a_retirement_survives_a_restart_in_file_mode_when_the_listing_fails(tmp_path: Path) -> None:
    """The server rewrites its trusted-keys file only at `serve` start, so after
    RetireSigningKey the file still says "active". The agent records the retirement it
    listed in its state dir; restarted, with ListSigningKeys failing, it still refuses."""
    old, new, added = Signer.generate(), Signer.generate(), Signer.generate()
    path = keys_file(tmp_path / "keys.json", old, new)
    state = tmp_path / "state"
    state.mkdir()

    async def listing() -> list[TrustedKey]:
        return list(trusted(old, new, retired=(old,)).values())

    async def unreachable() -> list[TrustedKey]:
        raise TransientFailure("cannot list the control plane's signing keys: UNAVAILABLE")

    first = BundleVerifier(KeyRing.from_file(path, state, fsync=False), listing)
    await first.check_signature(DIGEST, new.sign(DIGEST), new.key_id)
    with pytest.raises(ApplyFailed, match=f"signed by retired key {old.key_id}"):
        await first.check_signature(DIGEST, old.sign(DIGEST), old.key_id)
    assert set(load_trusted_keys(state / RETIRED_FILE)) == {old.key_id}

    # Restarted; the file still lists `old` as active and the listing fails.
    again = BundleVerifier(KeyRing.from_file(path, state, fsync=False), unreachable)
    with pytest.raises(ApplyFailed, match=f"signed by retired key {old.key_id}"):
        await again.check_signature(DIGEST, old.sign(DIGEST), old.key_id)
    await again.check_signature(DIGEST, new.sign(DIGEST), new.key_id)
    # The file can add keys but cannot revive a retired one, even rewritten.
    keys_file(path, old, new, added)
    await again.check_signature(DIGEST, added.sign(DIGEST), added.key_id)
    with pytest.raises(ApplyFailed, match="retired"):
        await again.check_signature(DIGEST, old.sign(DIGEST), old.key_id)
    # A retirement the file itself states is recorded too.
    keys_file(path, old, new, added, retired=(added,))
    await again.refresh()
    keys_file(path, old, new, added)
    ring = KeyRing.from_file(path, state, fsync=False)
    assert {k for k, v in ring.keys.items() if v.retired} == {old.key_id, added.key_id}


def test_pinned_retirements_are_recorded_and_an_unreadable_record_is_refused(tmp_path: Path) -> None:
    first, second = Signer.generate(), Signer.generate()
    ring = KeyRing.pinned_in(tmp_path, fsync=False)
    ring.merge_server(list(trusted(first, second).values()))
    ring.merge_server(list(trusted(first, second, retired=(first,)).values()))
    assert set(load_trusted_keys(tmp_path / RETIRED_FILE)) == {first.key_id}
    # Even if the pin file is rewritten with the key active, the record holds.
    keys_file(tmp_path / PIN_FILE, first, second)
    assert KeyRing.pinned_in(tmp_path, fsync=False).keys[first.key_id].retired
    (tmp_path / RETIRED_FILE).write_text("{")
    with pytest.raises(CorruptState, match=f"{RETIRED_FILE}.*saw retired"):
        KeyRing.pinned_in(tmp_path, fsync=False)


def test_trusted_keys_file(tmp_path: Path) -> None:
    a, b = Signer.generate(), Signer.generate()
    path = tmp_path / "keys.json"
    path.write_text(
        json.dumps(
            {
                "keys": [
                    {
                        "key_id": a.key_id,
                        "public_key": base64.b64encode(a.public_key).decode(),
                        "state": "ACTIVE",
                    },
                    {
                        "keyId": b.key_id,
                        "publicKey": base64.b64encode(b.public_key).decode(),
                        "state": "RETIRED",
                    },
                ]
            }
        )
    )
    keys = load_trusted_keys(path)
    assert keys[a.key_id].retired is False and keys[b.key_id].retired is True
    path.write_text(json.dumps([{"key_id": "0" * 16, "public_key": base64.b64encode(a.public_key).decode()}]))
    with pytest.raises(ValueError, match="does not match its public key"):
        load_trusted_keys(path)
    path.write_text(json.dumps({"keys": []}))
    with pytest.raises(ValueError, match="lists no keys"):
        load_trusted_keys(path)
