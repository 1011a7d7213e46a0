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


API_KEY_PREFIX = "cpk_"
_KEY_ID_HEX = 16


def new_api_key() -> tuple[str, str]:
    """A new API key: its public id and the whole secret `cpk_<id>_<random>`, shown once.
    The id travels inside the key so a check is one primary-key lookup."""
    key_id = secrets.token_hex(_KEY_ID_HEX // 2)
    return key_id, f"{API_KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def api_key_id(key: str) -> str | None:
    """The id inside an API key, or None if `key` does not have the shape of one."""
    if not key.startswith(API_KEY_PREFIX) or len(key) < len(API_KEY_PREFIX) + _KEY_ID_HEX + 2:
        return None
    key_id = key[len(API_KEY_PREFIX) : len(API_KEY_PREFIX) + _KEY_ID_HEX]
    if key[len(API_KEY_PREFIX) + _KEY_ID_HEX] != "_" or not all(c in "0123456789abcdef" for c in key_id):
        return None
    return key_id


# Stored in place of a revoked node's credential hash when its name may not enroll again;
# no sha256 hex digest can equal it. An empty hash means revoked, name free.
BARRED = "!barred"


def token_id(token_hash: str) -> str:
    """The public id of an enrollment token: a prefix of its hash (the hash of 256 random
    bits reveals nothing about the token), so no extra column is needed to name it."""
    return token_hash[:16]
