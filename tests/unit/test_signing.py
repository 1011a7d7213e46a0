"""Signatures: what is signed, key ids, and the agent's key ring refusing each forgery."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from agent_stub.errors import ApplyFailed
from agent_stub.verify import KeyRing, TrustedKey, load_trusted_keys
from controlplane.domain.signing import CONTEXT, Signer, key_id_of, parse_seed, signed_message, verify

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


def ring_of(*signers: Signer, retired: tuple[Signer, ...] = (), pinned: bool = True) -> KeyRing:
    keys = {s.key_id: TrustedKey(s.key_id, s.public_key, s in retired) for s in signers}
    return KeyRing(keys, pinned)


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
    # Without a file, the server's list is the ring (retirements still stick).
    open_ring = KeyRing()
    open_ring.merge_server([TrustedKey(theirs.key_id, theirs.public_key)])
    open_ring.check(DIGEST, theirs.sign(DIGEST), theirs.key_id)


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
