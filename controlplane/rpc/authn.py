"""Authentication: turning the `authorization: Bearer ...` a call carries into an Identity.

Three kinds of bearer, told apart by shape:

- a node token (a JWT, `eyJ...`): verified by signature and the in-memory revocation
  floors, never a database read, so a reconnect storm costs only signature checks;
- an API key (`cpk_<id>_<secret>`): one primary-key read, then cached briefly;
- a node credential (`<node id>.cpn_...`): accepted by IssueNodeToken and by the
  streams of nodes whose metadata is fixed at start (Envoy's ADS and stats sink),
  checked against the database each time (exchanges and stream opens are rare).

Those streams also accept, with no bearer at all, a client certificate issued by the
node CA (`--tls-node-ca`) that names the node (`NodeCertificates`, docs/xds.md).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from controlplane.domain.identity.api_keys import ApiKeyRegistry
from controlplane.domain.identity.node_credentials import NodeCredentials
from controlplane.domain.identity.node_tokens import NodeTokens
from controlplane.domain.kernel.errors import InvalidArgument, Unauthenticated
from controlplane.domain.kernel.secrets import API_KEY_PREFIX, hash_secret
from controlplane.domain.model.fleet import Node
from controlplane.rpc.auth import ANONYMOUS, Identity, Kind, Rule
from controlplane.xds.bootstrap import NODE_URI

# Longest accepted bearer: far above any token we issue, small enough to bound the work
# an attacker can make us do per call.
MAX_BEARER = 4096


class NodeCertificates:
    """Which node a client certificate names: one issued directly by a CA of the node CA
    file, with exactly one URI SAN `urn:controlplane:node:<project>:<node id>`. The TLS
    handshake has already checked the chain and validity period against the server's
    trust store (which holds these CAs); this checks the issuer is a *node* CA, so a
    certificate of the operators' client CA cannot name a node."""

    def __init__(self, ca_pem: bytes):
        self._cas = x509.load_pem_x509_certificates(ca_pem)

    def claim(self, pem: bytes) -> tuple[str, str]:
        """(project, node id) the certificate names; UNAUTHENTICATED otherwise."""
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise Unauthenticated("the client certificate does not parse") from None
        if not any(_issued_by(cert, ca) for ca in self._cas):
            raise Unauthenticated("the client certificate is not issued by a node CA (--tls-node-ca)")
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = [
                u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(NODE_URI)
            ]
        except x509.ExtensionNotFound:
            uris = []
        project, sep, node_id = (
            uris[0].removeprefix(NODE_URI).partition(":") if len(uris) == 1 else ("", "", "")
        )
        if not (project and sep and node_id) or ":" in node_id:
            raise Unauthenticated(
                f"a node certificate names one node: a URI SAN {NODE_URI}<project>:<node id>"
            )
        return project, node_id


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):  # another issuer name, key type, signature
        return False
    return True


# An enrollment token's prefix: on a node stream, an Envoy's first contact (docs/xds.md).
ENROLLMENT_PREFIX = "cpe_"
# (project, enrollment token, name, labels from node.metadata or None when not taken from
# it, agent version) -> the node and the log's head before it (NodeRegistry.contact).
XdsContact = Callable[[str, str, str, Mapping[str, str] | None, str], Awaitable[tuple[Node, int]]]


def _envoy_node(message: Any) -> Any:
    """The Envoy node a stream's first message names (ADS requests, metrics flushes)."""
    fields = message.DESCRIPTOR.fields_by_name if message is not None else {}
    if "identifier" in fields:
        return message.identifier.node
    return message.node if "node" in fields else None


def metadata_labels(node: Any) -> dict[str, str]:
    """The `labels` struct of an Envoy node's metadata, as strings."""
    found = node.metadata.fields.get("labels")
    if found is None:
        return {}
    if found.WhichOneof("kind") != "struct_value":
        raise InvalidArgument("must be a struct of strings", field="node.metadata.labels")
    labels = {}
    for key, value in found.struct_value.fields.items():
        if value.WhichOneof("kind") != "string_value":
            raise InvalidArgument(f"{key[:64]!r} must be a string", field="node.metadata.labels")
        labels[key] = value.string_value
    return labels


def agent_version(node: Any) -> str:
    """What an Envoy node says it runs: `envoy 1.40.0` from `user_agent_name` and
    `user_agent_build_version` (or `user_agent_version`, as gRPC clients send it)."""
    kind = node.WhichOneof("user_agent_version_type")
    if kind == "user_agent_build_version":
        v = node.user_agent_build_version.version
        version = f"{v.major_number}.{v.minor_number}.{v.patch}"
    elif kind == "user_agent_version":
        version = node.user_agent_version
    else:
        version = ""
    return " ".join(part for part in (node.user_agent_name, version) if part)[:64]


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
        node_certificates: NodeCertificates | None = None,
        xds_contact: XdsContact | None = None,
        xds_metadata_labels: bool = False,
    ):
        self._api_keys = api_keys
        self.node_certificates = node_certificates
        # Enrollment on first contact, and labels from node.metadata: off unless the
        # server is started with them (serve --xds-enrollment, --xds-metadata-labels).
        self._xds_contact = xds_contact
        self._xds_metadata_labels = xds_metadata_labels
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
        if rule is Rule.NODE_STREAM and bearer.startswith(ENROLLMENT_PREFIX):
            # Reached only when this server does not enroll (or no first message came).
            raise Unauthenticated(
                "this server enrolls no node on first contact (serve --xds-enrollment): "
                "use the node's credential"
            )
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

    @property
    def enrolls(self) -> bool:
        """Whether an enrollment token on a node stream is an Envoy's first contact."""
        return self._xds_contact is not None

    async def first_contact(self, token: str, first: Any) -> Identity:
        """An Envoy's node stream carrying an enrollment token: the node its first
        message names (`node.id` its name, `node.cluster` its project), registered on
        first contact or resumed after, its agent version and (with
        --xds-metadata-labels) its labels brought up to date (NodeRegistry.contact)."""
        assert self._xds_contact is not None, "only when it enrolls (`enrolls`)"
        node = _envoy_node(first)
        if node is None or not node.id:
            raise InvalidArgument("the first message must carry the node", field="node.id")
        if not node.cluster:
            raise InvalidArgument("must name the node's project", field="node.cluster")
        labels = metadata_labels(node) if self._xds_metadata_labels else None
        found, head = await self._xds_contact(node.cluster[:128], token, node.id, labels, agent_version(node))
        return Identity(Kind.NODE, found.id, found.project, revision=head, alias=found.name, node=found)

    async def certificate(self, pem: bytes) -> Identity:
        """The node a client certificate names (only the node-stream rule asks), if it
        is enrolled in that project and not revoked: checked against the database."""
        if self.node_certificates is None:
            raise Unauthenticated("this server identifies no node by its certificate (no --tls-node-ca)")
        project, node_id = self.node_certificates.claim(pem)
        node, head = await self._credentials.enrolled(node_id)
        if node.project != project:
            raise Unauthenticated(
                f"node {node.id} is not in project {project[:64]!r}, as its certificate says"
            )
        return Identity(Kind.NODE, node.id, node.project, revision=head, node=node)

    async def _credential(self, credential: str) -> Identity:
        node_id, sep, _ = credential.partition(".")
        if not sep or not node_id or credential.startswith(("eyJ", API_KEY_PREFIX)):
            raise Unauthenticated("not a node credential (the one RegisterNode issued: <node id>.cpn_...)")
        node, head = await self._credentials.verify(node_id, credential)
        return Identity(Kind.NODE, node.id, node.project, revision=head, node=node)

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
