"""Who is calling, and what each RPC requires of them.

Every RPC names its rule in `POLICY`; the interceptor refuses a method without one, so a
new RPC cannot ship unguarded by accident.
"""

from __future__ import annotations

import contextvars
import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from controlplane.domain.audit import ANONYMOUS as ANONYMOUS_ACTOR
from controlplane.domain.audit import Actor, ActorKind
from controlplane.domain.errors import PermissionDenied, Unauthenticated
from controlplane.domain.nodes import NodeRegistry
from controlplane.domain.secrets import hash_secret


class Rule(enum.Enum):
    """What a method requires of its caller."""

    # Open to anyone: health, reflection, enrollment (which checks its own token).
    PUBLIC = "public"
    # A node acting for itself.
    NODE = "node"
    # Operators and services: read, change, or administer (keys, projects).
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"
    # A node (for its own project) or an operator who may read.
    NODE_OR_READ = "node-or-read"


class Kind(enum.Enum):
    ANONYMOUS = "anonymous"
    NODE = "node"
    OPERATOR = "operator"


POLICY: dict[str, Rule] = {
    "/grpc.health.v1.Health/Check": Rule.PUBLIC,
    "/grpc.health.v1.Health/Watch": Rule.PUBLIC,
    "/grpc.health.v1.Health/List": Rule.PUBLIC,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Rule.PUBLIC,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": Rule.PUBLIC,
    "/controlplane.node.v1.NodeService/RegisterNode": Rule.PUBLIC,
    "/controlplane.node.v1.NodeService/Heartbeat": Rule.NODE,
    "/controlplane.node.v1.NodeService/ReportStatus": Rule.NODE,
    "/controlplane.watch.v1.WatchService/WatchBundles": Rule.NODE,
    "/controlplane.node.v1.NodeService/GetNode": Rule.READ,
    "/controlplane.node.v1.NodeService/ListNodes": Rule.READ,
    "/controlplane.node.v1.NodeService/UpdateNodeLabels": Rule.WRITE,
    "/controlplane.node.v1.NodeService/ListHeartbeats": Rule.READ,
    "/controlplane.project.v1.ProjectService/CreateProject": Rule.ADMIN,
    "/controlplane.project.v1.ProjectService/GetProject": Rule.READ,
    "/controlplane.project.v1.ProjectService/ListProjects": Rule.READ,
    "/controlplane.bundle.v1.BundleService/UploadBundle": Rule.WRITE,
    "/controlplane.bundle.v1.BundleService/DownloadBundle": Rule.NODE_OR_READ,
    "/controlplane.bundle.v1.BundleService/GetBundle": Rule.READ,
    "/controlplane.bundle.v1.BundleService/ListBundles": Rule.READ,
    "/controlplane.bundle.v1.BundleService/AssignBundle": Rule.WRITE,
    "/controlplane.bundle.v1.BundleService/UnassignBundle": Rule.WRITE,
    "/controlplane.rollout.v1.RolloutService/CreateRollout": Rule.WRITE,
    "/controlplane.rollout.v1.RolloutService/GetRollout": Rule.READ,
    "/controlplane.rollout.v1.RolloutService/ListRollouts": Rule.READ,
    "/controlplane.rollout.v1.RolloutService/ListRolloutNodes": Rule.READ,
    "/controlplane.rollout.v1.RolloutService/ListRolloutEvents": Rule.READ,
    "/controlplane.rollout.v1.RolloutService/PauseRollout": Rule.WRITE,
    "/controlplane.rollout.v1.RolloutService/ResumeRollout": Rule.WRITE,
    "/controlplane.rollout.v1.RolloutService/CancelRollout": Rule.WRITE,
    "/controlplane.rollout.v1.RolloutService/RollbackRollout": Rule.WRITE,
    "/controlplane.rollout.v1.RolloutService/ApproveRollout": Rule.WRITE,
    "/controlplane.rollout.v1.RolloutService/RejectRollout": Rule.WRITE,
    "/controlplane.rollout.v1.RolloutService/WatchRollout": Rule.READ,
    "/controlplane.rollout.v1.RolloutService/CreateFreezeWindow": Rule.WRITE,
    "/controlplane.rollout.v1.RolloutService/ListFreezeWindows": Rule.READ,
    "/controlplane.rollout.v1.RolloutService/DeleteFreezeWindow": Rule.ADMIN,
    "/controlplane.rollout.v1.RolloutService/PinNode": Rule.WRITE,
    "/controlplane.rollout.v1.RolloutService/UnpinNode": Rule.WRITE,
    "/controlplane.rollout.v1.DriftService/ListDriftEvents": Rule.READ,
    "/controlplane.rollout.v1.DriftService/GetDriftSettings": Rule.READ,
    "/controlplane.rollout.v1.DriftService/UpdateDriftSettings": Rule.ADMIN,
    "/controlplane.bundle.v1.BundleService/CreateBundle": Rule.WRITE,
    "/controlplane.bundle.v1.BundleService/DiffBundles": Rule.READ,
    "/controlplane.bundle.v1.BundleService/RevokeBundle": Rule.WRITE,
    "/controlplane.bundle.v1.BundleService/ListRevokedBundleNodes": Rule.READ,
    "/controlplane.bundle.v1.BundleService/GetValidationConfig": Rule.READ,
    # Admin: a project's validators may run programs on the control plane's host.
    "/controlplane.bundle.v1.BundleService/SetValidationConfig": Rule.ADMIN,
    "/controlplane.bundle.v1.SigningKeyService/ListSigningKeys": Rule.NODE_OR_READ,
    # Signing keys are the server's, not a project's: a global admin retires one.
    "/controlplane.bundle.v1.SigningKeyService/RetireSigningKey": Rule.ADMIN,
}


@dataclass(frozen=True, slots=True)
class Identity:
    kind: Kind
    subject: str = ""
    project: str = ""

    def actor(self) -> Actor:
        if self.kind is Kind.NODE:
            return Actor(ActorKind.NODE, self.subject, self.project)
        return ANONYMOUS_ACTOR


ANONYMOUS = Identity(Kind.ANONYMOUS)
_current: contextvars.ContextVar[Identity] = contextvars.ContextVar("identity", default=ANONYMOUS)


def current() -> Identity:
    return _current.get()


def set_current(identity: Identity) -> None:
    _current.set(identity)


def require_node(node_id: str) -> Identity:
    """The caller must be the node `node_id` itself."""
    identity = current()
    if identity.kind is Kind.NODE and identity.subject != node_id:
        raise PermissionDenied(f"node {identity.subject} cannot act for node {node_id!r}", field="node_id")
    return identity


def require_project(project: str) -> Identity:
    """A node may only touch its own project."""
    identity = current()
    if identity.kind is Kind.NODE and identity.project != project:
        raise PermissionDenied(f"node {identity.subject} belongs to another project", field="project")
    return identity


def bearer(metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
    for key, value in metadata:
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class NodeAuthenticator:
    """Checks node credentials, caching positive answers briefly: a reconnect storm of
    thousands of agents must not become thousands of database reads."""

    # How long a verified credential is trusted without asking the database again.
    TTL = 30.0

    def __init__(self, nodes: NodeRegistry, clock: Callable[[], float] = time.monotonic):
        self._nodes = nodes
        self._clock = clock
        self._cache: dict[str, tuple[Identity, float]] = {}

    async def authenticate(self, credential: str) -> Identity:
        key = hash_secret(credential)
        hit = self._cache.get(key)
        now = self._clock()
        if hit is not None and hit[1] > now:
            return hit[0]
        node_id, sep, _ = credential.partition(".")
        if not sep:
            raise Unauthenticated("node credential is malformed")
        node = await self._nodes.authenticate(node_id, credential)
        identity = Identity(Kind.NODE, node.id, node.project)
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[key] = (identity, now + self.TTL)
        return identity

    def forget(self, node_id: str) -> None:
        for key in [k for k, (ident, _) in self._cache.items() if ident.subject == node_id]:
            del self._cache[key]
