"""Bearer secrets: generated with enough entropy that a fast hash is safe to store."""

from __future__ import annotations

import hashlib
import hmac
import secrets


def new_secret(prefix: str) -> str:
    """A random secret with a readable prefix (`cpe_` enrollment, `cpn_` node)."""
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def hash_secret(secret: str) -> str:
    # 256 random bits need no slow KDF: nobody brute-forces the preimage.
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"
