"""Ed25519 signatures over bundle digests (PyNaCl).

What is signed is exactly `b"controlplane.bundle.v1\\x00" + digest` where digest is the
ASCII `sha256:<hex>` of the archive bytes. The prefix separates these signatures from
anything else a key might ever sign; the digest binds the archive, which binds its
manifest and every file. A key id is the first 16 hex digits of the sha256 of the raw
32-byte public key, so anyone holding the public key can recompute it.

The private key is a 32-byte seed, kept as hex in a 0600 file (generated on first start
in embedded mode) or given in configuration; it never enters the database.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

CONTEXT = b"controlplane.bundle.v1\x00"
ALGORITHM = "ed25519"
SEED_BYTES = 32


# What a key signs to vouch for another key (domain/bundles/key_trust.py): never a bundle digest.
ENDORSEMENT_CONTEXT = b"controlplane.signing-key-endorsement.v1\x00"


def signed_message(digest: str) -> bytes:
    return CONTEXT + digest.encode("ascii")


def verify_endorsement(endorser_public: bytes, endorsed_public: bytes, signature: bytes) -> bool:
    try:
        VerifyKey(endorser_public).verify(ENDORSEMENT_CONTEXT + endorsed_public, signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


def key_id_of(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()[:16]


def verify(public_key: bytes, digest: str, signature: bytes) -> bool:
    try:
        VerifyKey(public_key).verify(signed_message(digest), signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


def parse_seed(text: str) -> bytes:
    """A seed given as 64 hex digits (what `controlplane signing-keys generate` writes)."""
    cleaned = text.strip()
    try:
        seed = bytes.fromhex(cleaned)
    except ValueError:
        raise ValueError("a signing key is 64 hex digits (a 32-byte Ed25519 seed)") from None
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a signing key is {SEED_BYTES} bytes (64 hex digits), got {len(seed)}")
    return seed


@dataclass(frozen=True)
class Signer:
    """Signs digests with one private key."""

    _key: SigningKey

    @classmethod
    def from_seed(cls, seed: bytes) -> Signer:
        return cls(SigningKey(seed))

    @classmethod
    def generate(cls) -> Signer:
        return cls(SigningKey.generate())

    @property
    def seed(self) -> bytes:
        return bytes(self._key)

    @property
    def public_key(self) -> bytes:
        return bytes(self._key.verify_key)

    @property
    def key_id(self) -> str:
        return key_id_of(self.public_key)

    def sign(self, digest: str) -> bytes:
        return bytes(self._key.sign(signed_message(digest)).signature)

    def endorse(self, public_key: bytes) -> bytes:
        """Vouch for another key (domain/bundles/key_trust.py)."""
        return bytes(self._key.sign(ENDORSEMENT_CONTEXT + public_key).signature)
