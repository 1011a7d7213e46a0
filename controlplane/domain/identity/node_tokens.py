"""Short-lived node tokens: Ed25519-signed JWTs a node gets for its credential.

Verifying a token reads no database: the signature (a key of the keyring, by `kid`),
issuer, audience and expiry, then one dictionary lookup in `NodeRevocations` (fed by the
REVOKED rows the watch hub already reads). A token carries `rev`, the log's head revision
when it was issued; a revocation at revision R kills every token with `rev` < R.

Why `rev` < R is exact: the exchange reads the head *before* the credential. If it saw
the credential live, the revoking transaction (which clears the credential and appends
the REVOKED row at R in one commit) had not committed when the head was read, so that
head is below R. If it was committed, the credential read sees it cleared.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from controlplane.domain.kernel.errors import InvalidArgument, Unauthenticated
from controlplane.domain.model.desired import ChangeKind, DesiredRow, FeedPosition, FeedSnapshot

ISSUER = "controlplane"
AUDIENCE = "controlplane-node"
ALGORITHM = "EdDSA"
# Short enough that a stolen token dies on its own soon; long enough that 10,000 nodes
# refresh at ~11/s (each at two thirds of its life), one credential read each.
DEFAULT_TTL = timedelta(minutes=15)
# Replicas' clocks disagree a little; a token is not refused for a second of skew.
LEEWAY_SECONDS = 5
# Tokens already verified, kept until they expire. An agent reconnects with the token it
# holds (valid for minutes), so a reconnect storm is dictionary lookups, not 10,000
# Ed25519 verifications at ~150 µs each. Past this many, expired entries are swept.
VERIFIED_CACHE_SIZE = 200_000


def key_id(public: Ed25519PublicKey) -> str:
    """A key's id: derived from the key, so every replica names the same key alike."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_private_pem() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private(pem: bytes, source: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise InvalidArgument(
            f"{source}: not an unencrypted PEM private key ({e})", field="token_signing_key"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidArgument(
            f"{source}: the node token signing key must be Ed25519", field="token_signing_key"
        )
    return key


def load_public(pem: bytes, source: str) -> Ed25519PublicKey:
    """A verification key: a PEM public key, or a private key whose public half is meant."""
    try:
        if b"PRIVATE KEY" in pem:
            return load_private(pem, source).public_key()
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as e:
        raise InvalidArgument(f"{source}: not a PEM public key ({e})", field="token_verify_keys") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidArgument(f"{source}: node token keys must be Ed25519", field="token_verify_keys")
    return key


class TokenKeyring:
    """The key tokens are signed with, and every key they may be verified with.

    Rotation: start signing with a new key while the old one's public half stays in
    the verification set for one token lifetime, then drop it.
    """

    def __init__(self, signing: Ed25519PrivateKey, verifying: Iterable[Ed25519PublicKey] = ()):
        self._signing = signing
        self.signing_kid = key_id(signing.public_key())
        self._verifying: dict[str, Ed25519PublicKey] = {self.signing_kid: signing.public_key()}
        for public in verifying:
            self._verifying[key_id(public)] = public

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(self._verifying)

    def sign(self, claims: Mapping[str, Any]) -> str:
        return jwt.encode(dict(claims), self._signing, algorithm=ALGORITHM, headers={"kid": self.signing_kid})

    def public(self, kid: str) -> Ed25519PublicKey | None:
        return self._verifying.get(kid)


@dataclass(frozen=True, slots=True)
class NodeClaims:
    node_id: str
    project: str
    # The log's head when the token was issued (see the module docstring).
    revision: int
    expires_at: float


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    expires_at: datetime


@dataclass
class NodeRevocations:
    """Per node, the revision of its latest revocation: tokens issued before it are dead.

    Fed by `RevocationTap` with every row the hub reads, and at start from the log.
    """

    floors: dict[str, int] = field(default_factory=dict)

    def observe(self, rows: Iterable[DesiredRow]) -> None:
        for row in rows:
            if row.kind is ChangeKind.REVOKED and row.key.startswith("meta:"):
                node_id = row.key[5:]
                if row.revision > self.floors.get(node_id, 0):
                    self.floors[node_id] = row.revision

    def merge(self, floors: Mapping[str, int]) -> None:
        for node_id, revision in floors.items():
            if revision > self.floors.get(node_id, 0):
                self.floors[node_id] = revision

    def current(self, node_id: str, revision: int) -> bool:
        return revision >= self.floors.get(node_id, 0)


class _Feed(Protocol):
    async def position(self) -> FeedPosition: ...
    async def changes(self, after: int, upto: int) -> list[DesiredRow]: ...
    async def snapshot(self) -> FeedSnapshot: ...


class RevocationTap:
    """A change feed that shows every row it passes on to `NodeRevocations` first: the
    hub's one read of the log feeds token revocation too, at no extra query."""

    def __init__(self, feed: _Feed, revocations: NodeRevocations):
        self._feed = feed
        self._revocations = revocations

    async def position(self) -> FeedPosition:
        return await self._feed.position()

    async def changes(self, after: int, upto: int) -> list[DesiredRow]:
        rows = await self._feed.changes(after, upto)
        self._revocations.observe(rows)
        return rows

    async def snapshot(self) -> FeedSnapshot:
        snapshot = await self._feed.snapshot()
        self._revocations.observe(snapshot.rows)
        return snapshot


class NodeTokens:
    """Issues and verifies node tokens."""

    def __init__(
        self,
        keyring: TokenKeyring,
        revocations: NodeRevocations,
        ttl: timedelta = DEFAULT_TTL,
        clock: Any = time.time,
    ):
        self.keyring = keyring
        self.revocations = revocations
        self.ttl = ttl
        self._clock = clock
        self._verified: dict[str, NodeClaims] = {}

    def issue(self, node_id: str, project: str, revision: int) -> IssuedToken:
        now = int(self._clock())
        expires = now + int(self.ttl.total_seconds())
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": node_id,
            "prj": project,
            "rev": revision,
            "iat": now,
            "exp": expires,
        }
        return IssuedToken(self.keyring.sign(claims), datetime.fromtimestamp(expires, UTC))

    def verify(self, token: str) -> NodeClaims:
        """The claims of a valid, live token; Unauthenticated naming why otherwise.

        The signature is checked once per token; expiry and revocation on every call.
        """
        claims = self._verified.get(token)
        if claims is None:
            claims = self._verify_signed(token)
            if len(self._verified) >= VERIFIED_CACHE_SIZE:
                now = self._clock()
                self._verified = {t: c for t, c in self._verified.items() if c.expires_at > now}
            self._verified[token] = claims
        if claims.expires_at + LEEWAY_SECONDS <= self._clock():
            raise Unauthenticated("node token expired; exchange the node credential for a new one")
        if not self.revocations.current(claims.node_id, claims.revision):
            raise Unauthenticated("node token was revoked (the node's identity was revoked or rotated)")
        return claims

    def _verify_signed(self, token: str) -> NodeClaims:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError:
            raise Unauthenticated("node token is malformed") from None
        public = self.keyring.public(kid) if isinstance(kid, str) else None
        if public is None:
            raise Unauthenticated(f"node token is signed by an unknown key ({str(kid)[:32]!r})")
        try:
            claims = jwt.decode(
                token,
                public,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=ISSUER,
                # Expiry is checked below against our clock (one clock for issue and check).
                options={
                    "require": ["iss", "aud", "sub", "exp", "iat"],
                    "verify_exp": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidTokenError as e:
            raise Unauthenticated(f"node token is not valid: {e}") from None
        expires = claims["exp"]
        if not isinstance(expires, int | float):
            raise Unauthenticated("node token has no valid expiry")
        node_id, project, revision = claims.get("sub"), claims.get("prj"), claims.get("rev")
        if not isinstance(node_id, str) or not isinstance(project, str) or not isinstance(revision, int):
            raise Unauthenticated("node token is missing its node, project or revision")
        return NodeClaims(node_id, project, revision, float(expires))
