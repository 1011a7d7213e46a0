"""The world the authorization matrix calls into: callers of every kind, and for every
RPC a valid request, made against resources prepared for it, that an allowed caller
gets OK for. Requests of RPCs that consume their target (revoke a key, delete a freeze
window, cancel a rollout ...) are made afresh, target and all, for every call that is
meant to succeed."""

from __future__ import annotations

import enum
import itertools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import update

from controlplane.api.audit.v1 import audit_pb2 as apb
from controlplane.api.bundle.v1 import bundle_pb2 as bpb
from controlplane.api.bundle.v1 import bundle_pb2_grpc
from controlplane.api.bundle.v1 import signing_pb2 as spb
from controlplane.api.identity.v1 import identity_pb2 as ipb
from controlplane.api.identity.v1 import identity_pb2_grpc
from controlplane.api.node.v1 import node_pb2 as npb
from controlplane.api.node.v1 import node_pb2_grpc
from controlplane.api.notification.v1 import notification_pb2 as npf
from controlplane.api.notification.v1 import notification_pb2_grpc
from controlplane.api.project.v1 import project_pb2 as ppb
from controlplane.api.project.v1 import project_pb2_grpc
from controlplane.api.rollout.v1 import drift_pb2 as dpb
from controlplane.api.rollout.v1 import rollout_pb2 as rpb
from controlplane.api.rollout.v1 import rollout_pb2_grpc
from controlplane.api.watch.v1 import watch_pb2 as wpb
from controlplane.domain.bundles.keys import KeyDirectory
from controlplane.domain.bundles.signing import Signer
from controlplane.domain.model.roles import EVERY_PROJECT, Role
from controlplane.store.schema import api_keys, notification_messages
from tests.support.archives import bundle
from tests.support.bundles import create, file_messages
from tests.support.harness import Harness, Recorder, Registered, auth, signing
from tests.support.identities import OTHER_PROJECT, callers
from tests.support.rollout_fleet import Rollouts, seconds

PROJECT = "default"
# A request, or the messages of a client stream.
Request = Message | list[Message]
Builder = Callable[["World"], Awaitable[Request]]


class Kind(enum.Enum):
    NONE = "no credential"
    # A credential the server must refuse: expired, revoked, signed by an unknown key.
    INVALID = "invalid credential"
    NODE_CREDENTIAL = "node credential"
    NODE = "node token"
    KEY = "API key"


@dataclass(frozen=True)
class Caller:
    name: str
    kind: Kind
    metadata: tuple[tuple[str, str], ...]
    # An API key's grants: project (or `*`) -> role.
    grants: Mapping[str, Role] = field(default_factory=dict)
    # A node token's node.
    node_id: str = ""

    def role_in(self, project: str | None) -> Role | None:
        """The key's role in `project`; None (a global operation) needs a global grant."""
        roles = [self.grants.get(EVERY_PROJECT)]
        if project is not None:
            roles.append(self.grants.get(project))
        found = [r for r in roles if r is not None]
        return max(found) if found else None


@dataclass(frozen=True)
class Case:
    """One RPC (or one variant of its request) in the matrix."""

    rpc: str
    build: Builder
    # It consumes its target: a new one for every call meant to succeed.
    fresh: bool = False
    # The project it touches; None: a global operation (only a global grant reaches it).
    project: str | None = PROJECT
    variant: str = ""

    @property
    def label(self) -> str:
        return f"{self.rpc}[{self.variant}]" if self.variant else self.rpc


@dataclass
class World:
    h: Harness
    callers: dict[str, Caller]
    node: Registered
    main: str
    second: str
    rollout: str
    pinned: str
    report: npb.ReportStatusRequest
    validation: bpb.ValidationConfig
    # Calls preparing the world go through this channel, signed by a global admin key of
    # their own: the creator of a rollout may not approve it, nor may a key in its minting
    # line (the callers are its siblings, minted by the first-start key, and can).
    channel: grpc.aio.Channel
    stream: Recorder
    _counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.nodes = node_pb2_grpc.NodeServiceStub(self.channel)
        self.bundles = bundle_pb2_grpc.BundleServiceStub(self.channel)
        self.identity = identity_pb2_grpc.IdentityServiceStub(self.channel)
        self.projects = project_pb2_grpc.ProjectServiceStub(self.channel)
        self.rollouts = rollout_pb2_grpc.RolloutServiceStub(self.channel)
        self.following = Rollouts(self.channel)

    def unique(self, prefix: str) -> str:
        return f"{prefix}{next(self._counter)}"

    async def enroll(self, slot: str) -> str:
        """A new node of the project labelled `slot=<slot>`; its id."""
        reply = await self.nodes.RegisterNode(
            npb.RegisterNodeRequest(
                project=PROJECT, enrollment_token=self.h.token, name=f"m-{slot}", labels={"slot": slot}
            )
        )
        return str(reply.node_id)

    async def rollout_on_new_node(self, state: int) -> str:
        """A rollout of the main bundle to a node of its own, brought to `state`
        (awaiting approval, running or paused); its id."""
        slot = self.unique("r")
        await self.enroll(slot)
        approvals = 2 if state == rpb.ROLLOUT_STATE_PENDING_APPROVAL else 0
        reply = await self.rollouts.CreateRollout(
            create_rollout_request(self.main, f"slot={slot}", approvals_required=approvals)
        )
        rollout_id = str(reply.rollout.id)
        if state != rpb.ROLLOUT_STATE_PENDING_APPROVAL:
            # The node never reports, so the step waits for it (within an hour's deadline).
            await self.following.wait_state(rollout_id, rpb.ROLLOUT_STATE_RUNNING)
        if state == rpb.ROLLOUT_STATE_PAUSED:
            await self.rollouts.PauseRollout(rpb.PauseRolloutRequest(project=PROJECT, rollout_id=rollout_id))
        return rollout_id

    async def close(self) -> None:
        await self.stream.cancel()
        await self.channel.close()


def create_rollout_request(
    digest: str, selector: str, approvals_required: int = 0
) -> rpb.CreateRolloutRequest:
    return rpb.CreateRolloutRequest(
        project=PROJECT,
        bundle_digest=digest,
        selector=selector,
        strategy=rpb.STRATEGY_ALL_AT_ONCE,
        bake_time=seconds(0),
        progress_deadline=seconds(3600),
        approvals_required=approvals_required,
    )


def kdl(tag: str) -> dict[str, bytes]:
    """The files of a valid bundle whose digest depends on `tag`."""
    return {"main.kdl": b"listen 8080\n", "routes.kdl": f'route "/" upstream="{tag}"\n'.encode()}


def _in(days: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC) + timedelta(days=days))
    return stamp


async def world(h: Harness) -> World:
    """Callers, and the resources the requests name: the node most requests name (with a
    stream that delivered it a bundle), two valid bundles, a rollout awaiting approval, a
    pinned node."""
    base = await callers(h)
    factory_key = await h.api_key({EVERY_PROJECT: ipb.ROLE_ADMIN}, name="matrix factory")
    channel = grpc.aio.insecure_channel(h.address, interceptors=signing(factory_key))
    stubs = bundle_pb2_grpc.BundleServiceStub(channel)
    main = (await create(stubs, kdl("main"))).bundle.digest
    second = (await create(stubs, kdl("second"))).bundle.digest

    node = base.node
    stream = h.open_watch(node)
    await h.assign(main, nodes=[node.node_id])
    delivered = await stream.wait_digest(main)
    report = npb.ReportStatusRequest(
        node_id=node.node_id,
        stream_id=stream.stream_id,
        revision=delivered.revision,
        digest=main,
        phase=npb.REPORT_PHASE_DOWNLOADED,
    )
    validation = (await h.bundles.GetValidationConfig(bpb.GetValidationConfigRequest(project=PROJECT))).config
    w = World(h, {}, node, main, second, "", "", report, validation, channel, stream)
    w.rollout = await w.rollout_on_new_node(rpb.ROLLOUT_STATE_PENDING_APPROVAL)
    w.pinned = await w.enroll("pinned")
    await w.rollouts.PinNode(pin_request(w.pinned, main))
    w.callers = await _callers(h, base.by_name, node)
    return w


def pin_request(node_id: str, digest: str) -> rpb.PinNodeRequest:
    return rpb.PinNodeRequest(project=PROJECT, node_id=node_id, digest=digest, reason="held for the matrix")


async def _callers(h: Harness, by_name: dict[str, Any], node: Registered) -> dict[str, Caller]:
    """Every kind of caller; the invalid API keys would be global admins if they worked."""
    reader, operator, admin = Role.READER, Role.OPERATOR, Role.ADMIN
    # identities.callers made the other project's admin; its reader and operator here.
    # The global admin is a key of its own, not the first-start key: that one minted the
    # key creating the world's rollouts, so it may not approve them (a minting line).
    by_name = {
        **by_name,
        "other-project-reader": auth(await h.api_key({OTHER_PROJECT: ipb.ROLE_READER})),
        "other-project-operator": auth(await h.api_key({OTHER_PROJECT: ipb.ROLE_OPERATOR})),
        "global-admin": auth(await h.api_key({EVERY_PROJECT: ipb.ROLE_ADMIN}, name="global admin")),
    }
    expired = await h.api_key({EVERY_PROJECT: ipb.ROLE_ADMIN}, name="expired", ttl=Duration(seconds=3600))
    async with h.app.engine.begin() as conn:
        await conn.execute(
            update(api_keys)
            .where(api_keys.c.id == expired.split("_")[1])
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    revoked = await h.api_key({EVERY_PROJECT: ipb.ROLE_ADMIN}, name="revoked")
    await h.identity.RevokeApiKey(ipb.RevokeApiKeyRequest(key_id=revoked.split("_")[1]))
    other_node = await h.register("matrix-other-node", {"env": "prod"})

    def key(name: str, grants: dict[str, Role]) -> Caller:
        return Caller(name, Kind.KEY, by_name[name], grants)

    found = [
        Caller("none", Kind.NONE, ()),
        key("reader", {PROJECT: reader}),
        key("operator", {PROJECT: operator}),
        key("admin", {PROJECT: admin}),
        key("other-project-reader", {OTHER_PROJECT: reader}),
        key("other-project-operator", {OTHER_PROJECT: operator}),
        key("other-project-admin", {OTHER_PROJECT: admin}),
        key("global-admin", {EVERY_PROJECT: admin}),
        Caller("expired-key", Kind.INVALID, auth(expired)),
        Caller("revoked-key", Kind.INVALID, auth(revoked)),
        Caller("node", Kind.NODE, node.metadata, node_id=node.node_id),
        Caller("other-node", Kind.NODE, other_node.metadata, node_id=other_node.node_id),
        Caller("expired-token", Kind.INVALID, by_name["expired-token"]),
        Caller("unknown-key-token", Kind.INVALID, by_name["unknown-key-token"]),
        Caller("node-credential", Kind.NODE_CREDENTIAL, auth(node.credential), node_id=node.node_id),
    ]
    return {c.name: c for c in found}


# -- the requests ---------------------------------------------------------------------


async def _async(request: Request) -> Request:
    return request


def same(make: Callable[[World], Request]) -> Builder:
    """A request that does not use up its target: the same one for every caller."""

    async def build(w: World) -> Request:
        return make(w)

    return build


async def register_node(w: World) -> Request:
    return npb.RegisterNodeRequest(
        project=PROJECT, enrollment_token=w.h.token, name=w.unique("enrolled-"), labels={"slot": "enrolled"}
    )


async def revoke_bundle(w: World) -> Request:
    digest = (await create(w.bundles, kdl(w.unique("revoked-")))).bundle.digest
    return bpb.RevokeBundleRequest(project=PROJECT, digest=digest, reason="revoked by the matrix")


async def unassign_bundle(w: World) -> Request:
    target = bpb.Target(selector=f"slot={w.unique('u')}")
    await w.bundles.AssignBundle(bpb.AssignBundleRequest(project=PROJECT, target=target, digest=w.main))
    return bpb.UnassignBundleRequest(project=PROJECT, target=target)


async def retire_signing_key(w: World) -> Request:
    """A key of an earlier rotation, registered as a server started with it would."""
    current = w.h.app.signing_keys
    signer = Signer.generate()
    await KeyDirectory(current.store, current.clock, signer, lambda: None).register()
    return spb.RetireSigningKeyRequest(signing_key_id=signer.key_id)


async def create_project(w: World) -> Request:
    return ppb.CreateProjectRequest(name=w.unique("made-"))


async def revoke_api_key(w: World) -> Request:
    secret = await w.h.api_key({PROJECT: ipb.ROLE_READER}, name=w.unique("victim-"))
    return ipb.RevokeApiKeyRequest(key_id=secret.split("_")[1])


async def revoke_enrollment_token(w: World) -> Request:
    made = await w.identity.CreateEnrollmentToken(
        ipb.CreateEnrollmentTokenRequest(project=PROJECT, ttl=seconds(3600))
    )
    return ipb.RevokeEnrollmentTokenRequest(project=PROJECT, token_id=made.token.id)


async def revoke_node(w: World) -> Request:
    return ipb.RevokeNodeRequest(node_id=await w.enroll(w.unique("revoked-")))


async def create_rollout(w: World) -> Request:
    slot = w.unique("c")
    await w.enroll(slot)
    # Awaiting approvals, the rollout stays as created: the driver writes nothing for it.
    return create_rollout_request(w.main, f"slot={slot}", approvals_required=2)


def on_rollout(message: Callable[..., Message], state: int, **fields: str) -> Builder:
    """A request acting on a new rollout in `state`."""

    async def build(w: World) -> Request:
        rollout_id = await w.rollout_on_new_node(state)
        return message(project=PROJECT, rollout_id=rollout_id, **fields)

    return build


async def retry_rollout(w: World) -> Request:
    rollout_id = await w.rollout_on_new_node(RP)
    await w.rollouts.CancelRollout(rpb.CancelRolloutRequest(project=PROJECT, rollout_id=rollout_id))
    return rpb.RetryRolloutRequest(project=PROJECT, rollout_id=rollout_id)


def channel_spec(name: str) -> npf.ChannelSpec:
    """A disabled channel on a name that never resolves (`.invalid`): the matrix sends
    nothing anywhere."""
    return npf.ChannelSpec(
        name=name,
        kind=npf.CHANNEL_KIND_WEBHOOK,
        url="http://receiver.invalid/hook",
        secret="k",
        enabled=False,
    )


async def new_channel(w: World) -> str:
    stub = notification_pb2_grpc.NotificationServiceStub(w.channel)
    made = await stub.CreateChannel(
        npf.CreateChannelRequest(project=PROJECT, channel=channel_spec(w.unique("c")))
    )
    return str(made.channel.id)


def on_channel(message: Callable[..., Message], **fields: Any) -> Builder:
    async def build(w: World) -> Request:
        return message(project=PROJECT, channel_id=await new_channel(w), **fields)

    return build


async def redeliver_message(w: World) -> Request:
    """A dead letter, written as the worker leaves one (the matrix delivers nothing)."""
    channel_id = await new_channel(w)
    message_id = w.unique("msg-matrix-")
    now = datetime.now(UTC)
    async with w.h.app.engine.begin() as conn:
        await conn.execute(
            notification_messages.insert().values(
                id=message_id, channel_id=channel_id, project=PROJECT, kind="bundle.revoked", events=[],
                state="dead", attempts=8, created_at=now, next_attempt_at=now, last_error="HTTP 500",
                last_status=500,
            )
        )  # fmt: skip
    return npf.RedeliverMessageRequest(project=PROJECT, message_id=message_id)


async def delete_freeze_window(w: World) -> Request:
    made = await w.rollouts.CreateFreezeWindow(freeze_request())
    return rpb.DeleteFreezeWindowRequest(project=PROJECT, id=made.window.id)


def freeze_request() -> rpb.CreateFreezeWindowRequest:
    """A window a month away: it never holds the matrix's own rollouts."""
    return rpb.CreateFreezeWindowRequest(
        project=PROJECT, name="matrix freeze", starts_at=_in(30), ends_at=_in(31), reason="quarter close"
    )


async def routed_slot(w: World) -> tuple[str, str]:
    """A router node and a selector with one backend (with an address) of its own."""
    slot = w.unique("routed-")
    reply = await w.nodes.RegisterNode(
        npb.RegisterNodeRequest(
            project=PROJECT,
            enrollment_token=w.h.token,
            name=f"m-{slot}-web",
            labels={"slot": slot},
            address="127.0.0.1:8080",
        )
    )
    assert reply.node_id
    return await w.enroll(f"{slot}-edge"), f"slot={slot}"


async def declare_router(w: World) -> Request:
    router, selector = await routed_slot(w)
    return npb.DeclareRouterRequest(node_id=router, selector=selector, backend="app")


def on_router(message: Callable[..., Message]) -> Builder:
    """A request naming a router declared for it."""

    async def build(w: World) -> Request:
        declared = await declare_router(w)
        assert isinstance(declared, npb.DeclareRouterRequest)
        await w.nodes.DeclareRouter(declared)
        return message(node_id=declared.node_id)

    return build


async def unpin_node(w: World) -> Request:
    node_id = await w.enroll(w.unique("pinned-"))
    await w.rollouts.PinNode(pin_request(node_id, w.main))
    return rpb.UnpinNodeRequest(project=PROJECT, node_id=node_id)


def create_bundle(w: World) -> Request:
    header = bpb.CreateBundleRequest(header=bpb.CreateBundleHeader(project=PROJECT))
    return [header, *file_messages(kdl("created"))]


def upload_bundle(w: World) -> Request:
    header = bpb.UploadBundleHeader(project=PROJECT)
    return [bpb.UploadBundleRequest(header=header, chunk=bundle(kdl("uploaded")))]


def create_api_key(role: ipb.Role.ValueType) -> Builder:
    # An hour: a project admin's key may not mint one outliving it.
    return same(
        lambda w: ipb.CreateApiKeyRequest(
            name="minted by the matrix",
            grants=[ipb.Grant(project=PROJECT, role=role)],
            ttl=seconds(3600),
        )
    )


P = PROJECT
RP = rpb.ROLLOUT_STATE_PENDING_APPROVAL
RUN = rpb.ROLLOUT_STATE_RUNNING
PAUSED = rpb.ROLLOUT_STATE_PAUSED
HEALTHY = npb.NodeMetrics(health=npb.HEALTH_STATUS_HEALTHY, error_rate=0.01, p99_latency_ms=20)

CASES: list[Case] = [
    # NodeService
    Case("RegisterNode", register_node, fresh=True),
    Case("Heartbeat", same(lambda w: npb.HeartbeatRequest(node_id=w.node.node_id, metrics=HEALTHY))),
    Case("ReportStatus", same(lambda w: w.report)),
    Case("GetNode", same(lambda w: npb.GetNodeRequest(node_id=w.node.node_id))),
    Case("ListNodes", same(lambda w: npb.ListNodesRequest(project=P))),
    Case(
        "UpdateNodeLabels",
        same(lambda w: npb.UpdateNodeLabelsRequest(node_id=w.node.node_id, labels={"env": "prod"})),
    ),
    Case("ListHeartbeats", same(lambda w: npb.ListHeartbeatsRequest(node_id=w.node.node_id))),
    Case("DeclareRouter", declare_router, fresh=True),
    Case("RemoveRouter", on_router(npb.RemoveRouterRequest), fresh=True),
    Case("GetRouter", on_router(npb.GetRouterRequest), fresh=True),
    Case("ListRouters", same(lambda w: npb.ListRoutersRequest(project=P))),
    # WatchService
    Case("WatchBundles", same(lambda w: wpb.WatchBundlesRequest(node_id=w.node.node_id))),
    # BundleService
    Case("CreateBundle", same(create_bundle)),
    Case("UploadBundle", same(upload_bundle)),
    Case("DownloadBundle", same(lambda w: bpb.DownloadBundleRequest(project=P, digest=w.main))),
    Case("GetBundle", same(lambda w: bpb.GetBundleRequest(project=P, digest=w.main))),
    Case("ListBundles", same(lambda w: bpb.ListBundlesRequest(project=P))),
    Case(
        "DiffBundles",
        same(lambda w: bpb.DiffBundlesRequest(project=P, from_digest=w.main, to_digest=w.second)),
    ),
    Case("RevokeBundle", revoke_bundle, fresh=True),
    Case("ListRevokedBundleNodes", same(lambda w: bpb.ListRevokedBundleNodesRequest(project=P))),
    Case("GetValidationConfig", same(lambda w: bpb.GetValidationConfigRequest(project=P))),
    Case(
        "SetValidationConfig",
        same(lambda w: bpb.SetValidationConfigRequest(project=P, config=w.validation)),
    ),
    Case(
        "AssignBundle",
        same(
            lambda w: bpb.AssignBundleRequest(
                project=P, target=bpb.Target(selector="slot=assigned"), digest=w.main
            )
        ),
    ),
    Case("UnassignBundle", unassign_bundle, fresh=True),
    # SigningKeyService
    Case("ListSigningKeys", same(lambda w: spb.ListSigningKeysRequest(project=P))),
    Case("RetireSigningKey", retire_signing_key, fresh=True, project=None),
    # ProjectService
    Case("CreateProject", create_project, fresh=True, project=None),
    Case("GetProject", same(lambda w: ppb.GetProjectRequest(name=P))),
    Case("ListProjects", same(lambda w: ppb.ListProjectsRequest()), project=None),
    # The default policy: the rollouts made for later cases start without approvals.
    Case(
        "UpdateProjectPolicy",
        same(lambda w: ppb.UpdateProjectPolicyRequest(project=P, policy=ppb.ProjectPolicy(min_approvals=0))),
    ),
    # IdentityService
    Case("CreateApiKey", create_api_key(ipb.ROLE_READER)),
    Case("CreateApiKey", create_api_key(ipb.ROLE_ADMIN), variant="admin grant"),
    Case("ListApiKeys", same(lambda w: ipb.ListApiKeysRequest(project=P))),
    Case("RevokeApiKey", revoke_api_key, fresh=True),
    Case(
        "CreateEnrollmentToken",
        same(lambda w: ipb.CreateEnrollmentTokenRequest(project=P, ttl=seconds(3600), max_uses=1)),
    ),
    Case("ListEnrollmentTokens", same(lambda w: ipb.ListEnrollmentTokensRequest(project=P))),
    Case("RevokeEnrollmentToken", revoke_enrollment_token, fresh=True),
    Case("IssueNodeToken", same(lambda w: ipb.IssueNodeTokenRequest(node_id=w.node.node_id))),
    Case("RevokeNode", revoke_node, fresh=True),
    # AuditService
    Case("ListAuditEvents", same(lambda w: apb.ListAuditEventsRequest(project=P))),
    Case("ExportAuditEvents", same(lambda w: apb.ExportAuditEventsRequest(project=P))),
    Case("VerifyAuditChain", same(lambda w: apb.VerifyAuditChainRequest()), project=None),
    # RolloutService
    Case("CreateRollout", create_rollout, fresh=True),
    Case("GetRollout", same(lambda w: rpb.GetRolloutRequest(project=P, rollout_id=w.rollout))),
    Case("ListRollouts", same(lambda w: rpb.ListRolloutsRequest(project=P))),
    Case("ListRolloutNodes", same(lambda w: rpb.ListRolloutNodesRequest(project=P, rollout_id=w.rollout))),
    Case("ListRolloutEvents", same(lambda w: rpb.ListRolloutEventsRequest(project=P, rollout_id=w.rollout))),
    Case("PauseRollout", on_rollout(rpb.PauseRolloutRequest, RUN), fresh=True),
    Case("ResumeRollout", on_rollout(rpb.ResumeRolloutRequest, PAUSED), fresh=True),
    Case("CancelRollout", on_rollout(rpb.CancelRolloutRequest, RP), fresh=True),
    Case("RollbackRollout", on_rollout(rpb.RollbackRolloutRequest, RUN), fresh=True),
    Case("ApproveRollout", on_rollout(rpb.ApproveRolloutRequest, RP), fresh=True),
    Case("RejectRollout", on_rollout(rpb.RejectRolloutRequest, RP, reason="not today"), fresh=True),
    Case("WatchRollout", same(lambda w: rpb.WatchRolloutRequest(project=P, rollout_id=w.rollout))),
    Case("CreateFreezeWindow", same(lambda w: freeze_request())),
    Case("ListFreezeWindows", same(lambda w: rpb.ListFreezeWindowsRequest(project=P))),
    Case("DeleteFreezeWindow", delete_freeze_window, fresh=True),
    Case("PinNode", same(lambda w: pin_request(w.pinned, w.main))),
    Case("UnpinNode", unpin_node, fresh=True),
    Case("PromoteRollout", on_rollout(rpb.PromoteRolloutRequest, RUN), fresh=True),
    Case("SkipRolloutStep", on_rollout(rpb.SkipRolloutStepRequest, RUN), fresh=True),
    Case("RetryRollout", retry_rollout, fresh=True),
    # NotificationService
    Case(
        "CreateChannel",
        lambda w: _async(npf.CreateChannelRequest(project=P, channel=channel_spec(w.unique("n")))),
        fresh=True,
    ),
    Case("GetChannel", on_channel(npf.GetChannelRequest), fresh=True),
    Case("ListChannels", same(lambda w: npf.ListChannelsRequest(project=P))),
    Case("UpdateChannel", on_channel(npf.UpdateChannelRequest, enabled=False), fresh=True),
    Case("DeleteChannel", on_channel(npf.DeleteChannelRequest), fresh=True),
    Case("ListMessages", same(lambda w: npf.ListMessagesRequest(project=P))),
    Case("RedeliverMessage", redeliver_message, fresh=True),
    # DriftService
    Case("ListDriftEvents", same(lambda w: dpb.ListDriftEventsRequest(project=P))),
    Case("GetDriftSettings", same(lambda w: dpb.GetDriftSettingsRequest(project=P))),
    Case("UpdateDriftSettings", same(lambda w: dpb.UpdateDriftSettingsRequest(project=P, remediate=False))),
]
