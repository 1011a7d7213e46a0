"""Authentication: turning the `authorization: Bearer ...` a call carries into an Identity.

Three kinds of bearer, told apart by shape:

- a node token (a JWT, `eyJ...`): verified by signature and the in-memory revocation
  floors, never a database read, so a reconnect storm costs only signature checks;
- an API key (`cpk_<id>_<secret>`): one primary-key read, then cached briefly;
- a node credential (`<node id>.cpn_...`): accepted by IssueNodeToken and by the
  streams of nodes whose metadata is fixed at start (Envoy's ADS and stats sink),
  checked against the database each time (exchanges and stream opens are rare).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from controlplane.domain.identity.api_keys import ApiKeyRegistry
from controlplane.domain.identity.node_credentials import NodeCredentials
from controlplane.domain.identity.node_tokens import NodeTokens
from controlplane.domain.kernel.errors import Unauthenticated
from controlplane.domain.kernel.secrets import API_KEY_PREFIX, hash_secret
from controlplane.rpc.auth import ANONYMOUS, Identity, Kind, Rule

# Longest accepted bearer: far above any token we issue, small enough to bound the work
# an attacker can make us do per call.
MAX_BEARER = 4096


class Authenticator:
    # How long a verified API key is trusted without reading it again. It bounds how long
    # a key revoked on another replica keeps working here (this replica forgets at once).
    API_KEY_TTL = 5.0
    MAX_CACHED = 10_000

    def __init__(
        self,
        api_keys: ApiKeyRegistry,
        tokens: NodeTokens,
        credentials: NodeCredentials,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self._api_keys = api_keys
        self.tokens = tokens
        self._credentials = credentials
        self._clock = clock
        self._wall = wall
        self._keys: dict[str, tuple[Identity, float]] = {}

    async def authenticate(self, bearer: str | None, rule: Rule) -> Identity:
        if bearer is None:
            return ANONYMOUS
        if len(bearer) > MAX_BEARER:
            raise Unauthenticated("the bearer token is too long")
        if rule is Rule.NODE_CREDENTIAL:
            return await self._credential(bearer)
        if rule is Rule.NODE_STREAM and not bearer.startswith(("eyJ", API_KEY_PREFIX)):
            return await self._credential(bearer)
        if bearer.startswith("eyJ"):
            claims = self.tokens.verify(bearer)
            return Identity(Kind.NODE, claims.node_id, claims.project, revision=claims.revision)
        if bearer.startswith(API_KEY_PREFIX):
            return await self._api_key(bearer)
        raise Unauthenticated(
            "not a node token or API key (a node credential is only accepted by "
            "IdentityService/IssueNodeToken: exchange it for a token)"
        )

    async def _credential(self, credential: str) -> Identity:
        node_id, sep, _ = credential.partition(".")
        if not sep or not node_id or credential.startswith(("eyJ", API_KEY_PREFIX)):
            raise Unauthenticated("not a node credential (the one RegisterNode issued: <node id>.cpn_...)")
        node, head = await self._credentials.verify(node_id, credential)
        return Identity(Kind.NODE, node.id, node.project, revision=head)

    async def _api_key(self, secret: str) -> Identity:
        cache_key = hash_secret(secret)
        now = self._clock()
        hit = self._keys.get(cache_key)
        if hit is not None and hit[1] > now:
            identity = hit[0]
        else:
            principal = await self._api_keys.authenticate(secret)
            identity = Identity(Kind.OPERATOR, principal.key_id, principal=principal)
            if len(self._keys) >= self.MAX_CACHED:
                self._keys.clear()
            self._keys[cache_key] = (identity, now + self.API_KEY_TTL)
        expires = identity.principal.expires_at if identity.principal is not None else None
        if expires is not None and expires.timestamp() <= self._wall():
            self._keys.pop(cache_key, None)
            raise Unauthenticated(f"API key {identity.subject} expired at {expires.isoformat()}")
        return identity

    def forget_key(self, key_id: str) -> None:
        """A key was revoked here: stop trusting it at once."""
        for cache_key in [k for k, (ident, _) in self._keys.items() if ident.subject == key_id]:
            del self._keys[cache_key]
