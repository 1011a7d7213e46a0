"""Who is calling, and what each RPC requires of them.

Every RPC names its rule in `POLICY`; the interceptor refuses a method without one, so a
new RPC cannot ship unguarded by accident. `docs/security.md` carries the table of RPC x
role this produces (a test regenerates it and fails when the document is stale).
"""

from __future__ import annotations

import contextvars
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from controlplane.domain.audit.context import ANONYMOUS as ANONYMOUS_ACTOR
from controlplane.domain.audit.context import Actor, ActorKind
from controlplane.domain.kernel.errors import PermissionDenied
from controlplane.domain.model.fleet import Node
from controlplane.domain.model.roles import Principal, Role


class Rule(enum.Enum):
    """What a method requires of its caller."""

    # Open to anyone: health, reflection, enrollment (which checks its own token).
    PUBLIC = "public"
    # A node acting for itself, with a node token.
    NODE = "node"
    # Operators and services, by API key: read, change, or administer (keys, projects).
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"
    # A node (for its own project) or an operator who may read.
    NODE_OR_READ = "node-or-read"
    # A node presenting its long-lived credential: only to exchange it for a token.
    NODE_CREDENTIAL = "node-credential"
    # A node on a stream whose metadata is fixed when the node starts (Envoy's ADS and
    # stats sink: docs/xds.md): its long-lived, revocable credential or a node token.
    NODE_STREAM = "node-stream"


# The role an operator key needs, in the request's project, for each operator rule.
ROLE_FOR = {
    Rule.READ: Role.READER,
    Rule.WRITE: Role.OPERATOR,
    Rule.ADMIN: Role.ADMIN,
    Rule.NODE_OR_READ: Role.READER,
}


class Kind(enum.Enum):
    ANONYMOUS = "anonymous"
    NODE = "node"
    OPERATOR = "operator"


_IDENTITY = "/controlplane.identity.v1.IdentityService/"
_AUDIT = "/controlplane.audit.v1.AuditService/"
_NOTIFY = "/controlplane.notification.v1.NotificationService/"
_ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"

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
    "/controlplane.node.v1.NodeService/DeclareRouter": Rule.WRITE,
    "/controlplane.node.v1.NodeService/RemoveRouter": Rule.WRITE,
    "/controlplane.node.v1.NodeService/GetRouter": Rule.READ,
    "/controlplane.node.v1.NodeService/ListRouters": Rule.READ,
    "/controlplane.project.v1.ProjectService/CreateProject": Rule.ADMIN,
    "/controlplane.project.v1.ProjectService/GetProject": Rule.READ,
    "/controlplane.project.v1.ProjectService/ListProjects": Rule.READ,
    "/controlplane.project.v1.ProjectService/UpdateProjectPolicy": Rule.ADMIN,
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
    "/controlplane.rollout.v1.RolloutService/PromoteRollout": Rule.WRITE,
    "/controlplane.rollout.v1.RolloutService/SkipRolloutStep": Rule.WRITE,
    "/controlplane.rollout.v1.RolloutService/RetryRollout": Rule.WRITE,
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
    _IDENTITY + "CreateApiKey": Rule.ADMIN,
    _IDENTITY + "ListApiKeys": Rule.ADMIN,
    _IDENTITY + "RevokeApiKey": Rule.ADMIN,
    _IDENTITY + "CreateEnrollmentToken": Rule.ADMIN,
    _IDENTITY + "ListEnrollmentTokens": Rule.ADMIN,
    _IDENTITY + "RevokeEnrollmentToken": Rule.ADMIN,
    _IDENTITY + "RevokeNode": Rule.ADMIN,
    _IDENTITY + "IssueNodeToken": Rule.NODE_CREDENTIAL,
    _AUDIT + "ListAuditEvents": Rule.READ,
    _AUDIT + "ExportAuditEvents": Rule.READ,
    _AUDIT + "VerifyAuditChain": Rule.ADMIN,
    # Channels send the project's events out of the control plane, with secrets: admins.
    _NOTIFY + "CreateChannel": Rule.ADMIN,
    _NOTIFY + "GetChannel": Rule.READ,
    _NOTIFY + "ListChannels": Rule.READ,
    _NOTIFY + "UpdateChannel": Rule.ADMIN,
    _NOTIFY + "DeleteChannel": Rule.ADMIN,
    _NOTIFY + "ListMessages": Rule.READ,
    _NOTIFY + "RedeliverMessage": Rule.WRITE,
    _ADS + "StreamAggregatedResources": Rule.NODE_STREAM,
    _ADS + "DeltaAggregatedResources": Rule.NODE_STREAM,
    "/envoy.service.metrics.v3.MetricsService/StreamMetrics": Rule.NODE_STREAM,
}


@dataclass(frozen=True, slots=True)
class Identity:
    kind: Kind
    # The node id, or the API key id.
    subject: str = ""
    # A node's project.
    project: str = ""
    # An operator key's grants.
    principal: Principal | None = None
    # A node: the log head its token (or credential check) was issued at.
    revision: int = 0
    # A node an Envoy enrolled on first contact: the name it goes by (its Envoy `node.id`).
    alias: str = ""
    # A node: its record as authentication read it (a credential or certificate check
    # reads the row anyway), for the call to use instead of reading it again (`take_node`).
    node: Node | None = field(default=None, compare=False, repr=False)

    def actor(self) -> Actor:
        if self.kind is Kind.NODE:
            return Actor(ActorKind.NODE, self.subject, self.project)
        if self.kind is Kind.OPERATOR:
            return Actor(ActorKind.OPERATOR, self.subject)
        return ANONYMOUS_ACTOR


ANONYMOUS = Identity(Kind.ANONYMOUS)
_current: contextvars.ContextVar[Identity] = contextvars.ContextVar("identity", default=ANONYMOUS)


def current() -> Identity:
    return _current.get()


def set_current(identity: Identity) -> None:
    _current.set(identity)


def take_node(node_id: str) -> Node | None:
    """The record of node `node_id` that authenticating this call read, if it did; handed
    out once, so the identity a stream keeps for its life holds no copy of it."""
    identity = current()
    node = identity.node
    if node is None:
        return None
    set_current(replace(identity, node=None))
    return node if node.id == node_id else None


def require_node(node_id: str) -> Identity:
    """The caller must be the node `node_id` itself (the interceptor checks this too)."""
    identity = current()
    if identity.kind is Kind.NODE and identity.subject != node_id:
        raise PermissionDenied(f"node {identity.subject} cannot act for node {node_id!r}", field="node_id")
    return identity


def require_project(project: str) -> Identity:
    """A node may only touch its own project, an operator only projects it holds a role
    in (the interceptor checks this too; servicers call it as a second line)."""
    identity = current()
    if identity.kind is Kind.NODE and identity.project != project:
        raise PermissionDenied(f"node {identity.subject} belongs to another project", field="project")
    if identity.principal is not None and identity.principal.role_in(project) is None:
        raise PermissionDenied(f"this key has no role in project {project!r}", field="project")
    return identity


def require_admin_for(project: str, field: str, what: str) -> None:
    """PERMISSION_DENIED unless the caller is an admin of `project` (a global admin is)."""
    identity = current()
    role = identity.principal.role_in(project) if identity.principal is not None else None
    if role is not Role.ADMIN:
        raise PermissionDenied(f"{what} needs the admin role in project {project!r}", field=field)


def bearer(metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
    for key, value in metadata:
        if key == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None
