"""Node lifecycle: registration, heartbeats, status reports, labels, liveness."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from controlplane.domain.audit.context import Actor, ActorKind, acting_as, current_request_id
from controlplane.domain.fleet.group_commit import GroupCommit, Submitted
from controlplane.domain.fleet.heartbeats import HeartbeatWriter
from controlplane.domain.identity import enrollment
from controlplane.domain.identity.node_credentials import append_revocation
from controlplane.domain.kernel import validation
from controlplane.domain.kernel.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    Unauthenticated,
)
from controlplane.domain.kernel.labels import (
    Selector,
    meta_key,
    node_key,
    validate_labels,
    validate_node_name,
)
from controlplane.domain.kernel.secrets import BARRED, hash_secret, new_id, new_secret, secret_matches
from controlplane.domain.model.desired import ChangeKind, DesiredRow
from controlplane.domain.model.fleet import (
    Enrollment,
    HeartbeatRecord,
    Node,
    NodeMetrics,
    NodeStatus,
    ReportPhase,
    StatusReport,
    XdsRecord,
)
from controlplane.domain.model.notify import EventKind as NotifyKind
from controlplane.domain.model.notify import NotificationEvent
from controlplane.domain.model.routing import Router
from controlplane.domain.ports import Clock, DeliveryLedger, DesiredView, Store, Tx
from controlplane.domain.projects import require_project
from controlplane.domain.routing.checks import node_address
from controlplane.domain.routing.tables import refresh as refresh_routes

# Ten minutes of history at the default 10 s interval: enough for a health gate's window,
# bounded whatever the fleet does (a ring buffer per node, never one row per beat).
HEARTBEAT_HISTORY = 60
MAX_ERROR_TEXT = 4096
# A registration whose node never heartbeated nor reported within this time is taken to
# have lost its answer: the name may be enrolled again with the token alone.
UNCLAIMED_WINDOW = timedelta(minutes=10)
# How long a write waits for this process's watch hub to route it before answering, so a
# caller's next read sees it; the hub reads within milliseconds unless the database stalls.
READ_YOUR_WRITES = 2.0


class _EnrolledMeanwhile(Exception):
    """A first contact found the Envoy enrolled on first contact by another of its
    streams since it looked: resume that node (NodeRegistry.contact)."""


@dataclass(frozen=True, slots=True)
class Registration:
    node: Node
    credential: str
    revision: int


@dataclass
class NodeRegistry:
    store: Store
    clock: Clock
    view: DesiredView
    ledger: DeliveryLedger
    notify: Callable[[], None]
    heartbeat_interval: timedelta = timedelta(seconds=10)
    on_nack: Callable[[Node, StatusReport], None] = field(default=lambda node, report: None)
    # Called after every recorded report (the rollout driver wakes on it).
    on_report: Callable[[], None] = field(default=lambda: None)
    # Called after a recorded ACTIVE or FAILED report with the node's project and id
    # (routing tables follow what backends run: domain/routing/follow.py).
    on_applied: Callable[[str, str], None] = field(default=lambda project, node_id: None)

    def __post_init__(self) -> None:
        self._heartbeats = HeartbeatWriter(self.store, HEARTBEAT_HISTORY)
        self._reports: GroupCommit[_Report, Node | None] = GroupCommit(self._commit_reports, "reports")

    async def settle(self) -> None:
        """Return once no heartbeat or report batch is still being written."""
        await self._heartbeats.settle()
        await self._reports.settle()

    async def register(
        self,
        project: str,
        enrollment_token: str,
        name: str,
        labels: Mapping[str, str],
        agent_version: str = "",
        hostname: str = "",
        current_credential: str = "",
        address: str = "",
        enrolled: Enrollment = Enrollment.REGISTERED,
    ) -> Registration:
        """Enroll a node with an enrollment token (one use of it is spent).

        A name that is already registered with a live credential is only taken by a
        caller presenting that credential (`current_credential`): holding the project's
        enrollment token is not enough to take over another node's identity. An
        operator frees the name by revoking the node (`RevokeNode`). One exception: a
        node that registered moments ago and was never heard from again (no heartbeat,
        no report) may register again with the token — its first answer was most likely
        lost, and without it the name would be locked for good.
        """
        labels = validate_labels(labels)
        address = node_address(address)
        if name:
            validate_node_name(name)
        if not enrollment_token:
            raise Unauthenticated("an enrollment token is required", field="enrollment_token")
        now = self.clock()
        async with self.store.write() as tx:
            await require_project(tx, project)
            token = await enrollment.use(tx, project, enrollment_token, self.clock)
            existing = await tx.nodes.get_by_name(project, name) if name else None
            node_id = existing.id if existing is not None else new_id("n")
            # The id travels with the secret so a check needs one indexed lookup.
            credential = f"{node_id}.{new_secret('cpn')}"
            if existing is not None:
                stored = await tx.nodes.credential_hash(existing.id)
                if (
                    enrolled is Enrollment.XDS_FIRST_CONTACT
                    and existing.enrollment is Enrollment.XDS_FIRST_CONTACT
                    and stored not in ("", BARRED)
                ):
                    # Another stream of the same Envoy (ADS and its stats sink open
                    # together) enrolled it a moment ago: nothing is spent, nothing
                    # rotated (which would end that stream); contact() resumes it.
                    raise _EnrolledMeanwhile()
                if stored == BARRED:
                    raise PermissionDenied(
                        f"node {name!r} was revoked; an admin must allow it to enroll again "
                        "(RevokeNode with allow_reenroll)",
                        field="name",
                    )
                proven = bool(current_credential) and secret_matches(current_credential, stored or "")
                if stored and not proven and not _unclaimed(existing, now):
                    raise AlreadyExists(
                        f"node {name!r} is registered with a live credential: register again with it "
                        "(authorization: Bearer <node credential>) or have an operator revoke the node",
                        field="name",
                    )
                await tx.nodes.update_registration(
                    existing.id,
                    labels,
                    hash_secret(credential),
                    agent_version[:64],
                    hostname[:255],
                    address,
                    enrolled,
                )
                # The old credential's tokens and streams end with it, on every replica;
                # the meta row written below makes the node known again.
                await append_revocation(tx, existing, now.timestamp(), self.notify)
                labels_changed = True
                with acting_as(Actor(ActorKind.NODE, node_id, project), current_request_id()):
                    await tx.audit.record(
                        "node.reregister",
                        f"node/{node_id}",
                        project=project,
                        before={
                            "labels": dict(existing.labels),
                            "credential": "live" if stored else "revoked",
                        },
                        after={
                            "labels": labels,
                            "credential": "rotated",
                            "enrollment_token": token.id,
                            "enrollment": enrolled.value,
                            **({"address": address} if address != existing.address else {}),
                        },
                    )
            else:
                node = Node(
                    id=node_id,
                    project=project,
                    name=name or node_id,
                    labels=labels,
                    status=NodeStatus.OFFLINE,
                    registered_at=now,
                    agent_version=agent_version[:64],
                    hostname=hostname[:255],
                    address=address,
                    enrollment=enrolled,
                )
                await tx.nodes.insert(node, hash_secret(credential))
                labels_changed = True
                with acting_as(Actor(ActorKind.NODE, node_id, project), current_request_id()):
                    await tx.audit.record(
                        "node.register",
                        f"node/{node_id}",
                        project=project,
                        after={
                            "name": node.name,
                            "labels": labels,
                            "agent_version": node.agent_version,
                            "enrollment_token": token.id,
                            "enrollment": enrolled.value,
                            "address": address,
                        },
                    )
            revision = await self._write_labels(tx, project, node_id, labels) if labels_changed else 0
            # Routers of the selectors it left or joined route to it (or no more), at its
            # address now.
            before_labels = dict(existing.labels) if existing is not None else {}
            await refresh_routes(tx, project, now, affects=_matching(before_labels, labels))
            stored_node = await tx.nodes.get(node_id)
        assert stored_node is not None
        # The hub knows the node (and has dropped its old tokens) before the agent's
        # next call, so its first watch opens without waiting.
        await self.view.wait_until(None, revision, READ_YOUR_WRITES)
        return Registration(node=stored_node, credential=credential, revision=revision)

    async def contact(
        self,
        project: str,
        enrollment_token: str,
        name: str,
        labels: Mapping[str, str] | None,
        agent_version: str = "",
    ) -> tuple[Node, int]:
        """An Envoy's first contact with an enrollment token registers it by `name`, as
        RegisterNode does (a use of the token is spent; its credential is never handed
        out: Envoy's metadata is static, so the token comes back on every reconnect).
        Later contacts resume that node, spending nothing, while the token is neither
        revoked nor expired, and bring it up to date: its agent version (what Envoy says
        it runs), and its labels when `labels` is given (the server takes them from
        node.metadata) unless an operator has set them since. A node revoked with
        re-enrollment allowed is enrolled again. Returns the node and the log's head read
        before it (or the revision its labels were written at)."""
        if labels is not None:
            labels = validate_labels(labels)
        agent_version = agent_version[:64]
        async with self.store.read() as tx:
            head = await tx.desired.head()
            await require_project(tx, project)
            existing = await tx.nodes.get_by_name(project, name) if name else None
            if existing is not None:
                await enrollment.live(tx, project, enrollment_token, self.clock)
                stored = await tx.nodes.credential_hash(existing.id)
        if existing is None or stored == "":
            try:
                registration = await self.register(
                    project,
                    enrollment_token,
                    name,
                    labels or {},
                    agent_version=agent_version,
                    enrolled=Enrollment.XDS_FIRST_CONTACT,
                )
            except _EnrolledMeanwhile:
                return await self.contact(project, enrollment_token, name, labels, agent_version)
            return registration.node, registration.revision
        if stored in (None, BARRED):
            raise Unauthenticated(f"node {name[:64]!r} was revoked")
        if existing.enrollment is not Enrollment.XDS_FIRST_CONTACT:
            raise PermissionDenied(
                f"node {name[:64]!r} holds a credential of its own: an enrollment token cannot act as it"
            )
        if _contact_changes(existing, labels, agent_version):
            return await self._update_on_contact(existing.id, enrollment_token, labels, agent_version, head)
        return existing, head

    async def _update_on_contact(
        self,
        node_id: str,
        enrollment_token: str,
        labels: Mapping[str, str] | None,
        agent_version: str,
        head: int,
    ) -> tuple[Node, int]:
        """Write what a later contact changed (checked again under the row's lock: the
        ADS and stats streams of one Envoy contact at about the same time)."""
        revision = 0
        async with self.store.write() as tx:
            [node] = await tx.nodes.get_many([node_id], for_update=True)
            if agent_version and agent_version != node.agent_version:
                await tx.nodes.set_agent_version(node_id, agent_version)
            if _relabels(node, labels):
                assert labels is not None
                token = await enrollment.live(tx, node.project, enrollment_token, self.clock)
                await tx.nodes.set_labels(node_id, labels, by_operator=False)
                revision = await self._write_labels(tx, node.project, node_id, labels)
                await refresh_routes(tx, node.project, self.clock(), affects=_matching(node.labels, labels))
                with acting_as(Actor(ActorKind.NODE, node_id, node.project), current_request_id()):
                    await tx.audit.record(
                        "node.relabel",
                        f"node/{node_id}",
                        project=node.project,
                        before={"labels": dict(node.labels)},
                        after={
                            "labels": dict(labels),
                            "revision": revision,
                            "from": "node.metadata",
                            "enrollment_token": token.id,
                        },
                    )
            updated = await tx.nodes.get(node_id)
        assert updated is not None
        # The stream's first resolution sees its new labels' selectors.
        await self.view.wait_until(None, revision, READ_YOUR_WRITES)
        return updated, max(head, revision)

    async def heartbeat(self, node_id: str, metrics: NodeMetrics, applied_digest: str) -> timedelta:
        _check_metrics(metrics)
        if applied_digest:
            validation.digest(applied_digest, "applied_digest")
        beat = HeartbeatRecord(received_at=self.clock(), metrics=metrics, applied_digest=applied_digest)
        await self._heartbeats.write(node_id, beat)
        return self.heartbeat_interval

    async def report_status(
        self,
        node_id: str,
        stream_id: str,
        revision: int,
        digest: str,
        phase: ReportPhase,
        error: str,
        xds: XdsRecord | None = None,
    ) -> None:
        """Record a node's report; an xDS node's acknowledged versions (`xds`) are kept
        with it, so every replica can show them (`xds_record`)."""
        validation.digest(digest)
        if revision <= 0:
            raise InvalidArgument("must be a revision the node received (> 0)", field="revision")
        if not stream_id:
            raise InvalidArgument("must name the stream that delivered the desired state", field="stream_id")
        if phase is ReportPhase.FAILED and not error:
            raise InvalidArgument("a FAILED report must say why", field="error")
        if len(error) > MAX_ERROR_TEXT:
            raise InvalidArgument(f"at most {MAX_ERROR_TEXT} characters", field="error")
        report = StatusReport(stream_id, revision, digest, phase, error, self.clock(), xds)
        node = await self._reports.submit((node_id, report))
        if node is None:
            return  # a replay of the report already held
        if phase is ReportPhase.FAILED:
            self.on_nack(node, report)
        self.on_report()
        if phase is not ReportPhase.DOWNLOADED:
            self.on_applied(node.project, node_id)

    async def _commit_reports(self, batch: list[Submitted[_Report]]) -> list[Node | Exception | None]:
        """Check and record a batch of reports in one transaction, in arrival order: a
        report sees the ones before it (a node's DOWNLOADED and ACTIVE often come
        together). Each outcome is the node as it was before its report, None for a
        replay, or the error that report alone earned. Every report is checked before
        the first is written, and the accepted ones are written together: a few
        statements whatever the batch's size (`record_reports`)."""
        outcomes: list[Node | Exception | None] = []
        accepted: list[_Report] = []
        # Each project's selector keys, read once per batch (only reports whose stream
        # is not on this replica look them up).
        selectors: dict[str, list[str]] = {}
        async with self.store.write() as tx:
            # Locked (PostgreSQL): a report another replica records for the same node
            # meanwhile waits, then is checked against this one, never overwritten by it.
            batch_ids = {s.item[0] for s in batch}
            nodes = {n.id: n for n in await tx.nodes.get_many(batch_ids, for_update=True)}
            # The head after the locks: a revision another replica committed while they
            # were awaited (and a report at it) is then below the head, so a late report
            # of an older revision is judged stale against it, never taken as new.
            head = await tx.desired.head()
            for s in batch:
                node_id, report = s.item
                try:
                    with acting_as(s.actor, s.request_id):
                        node = await self._check_report(
                            tx, nodes.get(node_id), node_id, head, report, selectors
                        )
                except DomainError as e:
                    outcomes.append(e)
                    continue
                outcomes.append(node)
                if node is not None:
                    nodes[node_id] = _after(node, report)
                    accepted.append(s.item)
            if accepted:
                await tx.nodes.record_reports(accepted)
                await tx.nodes.announce_reports()
        return outcomes

    async def _check_report(
        self,
        tx: Tx,
        node: Node | None,
        node_id: str,
        head: int,
        report: StatusReport,
        selectors: dict[str, list[str]],
    ) -> Node | None:
        """Check one report against the node as the reports before it in the batch left
        it; an accepted one has its audit entry recorded (it is chained with the
        transaction's others at commit) and is written by the caller with the batch.
        Returns the node as it was, or None for a replay (nothing to write)."""
        revision, digest, phase = report.revision, report.digest, report.phase
        if node is None:
            raise NotFound(f"node {node_id!r} does not exist", field="node_id")
        if revision > head:
            raise OutOfRange(f"revision {revision} was never issued (head is {head})", field="revision")
        # The stream that sent it knows exactly what it sent; a stream of another
        # replica (or one already gone) falls back to the log.
        sent = self.ledger.was_sent(report.stream_id, node_id, revision, digest)
        if sent is False:
            raise FailedPrecondition(
                f"stream {report.stream_id} never sent revision {revision} with {digest} to node {node_id}"
            )
        if sent is None and not await tx.desired.was_desired(
            await _assignment_keys(tx, node, selectors), digest, revision
        ):
            raise FailedPrecondition(
                f"node {node_id} was never sent {digest} at or before revision {revision}", field="digest"
            )
        last = node.last_report
        if last is not None and last.revision <= head and _is_stale(last, report):
            if (last.revision, last.digest, last.phase) == (revision, digest, phase):
                return None  # a replay of the report we already hold: idempotent
            raise FailedPrecondition(
                f"stale report: node already reported {last.phase.value} for revision {last.revision}",
                field="revision",
            )
        if phase is ReportPhase.FAILED:
            await tx.audit.record(
                "node.nack",
                f"node/{node_id}",
                project=node.project,
                after={"digest": digest, "revision": revision, "error": report.error},
            )
        elif phase is ReportPhase.ACTIVE and digest != node.applied_digest:
            await tx.audit.record(
                "node.applied",
                f"node/{node_id}",
                project=node.project,
                before={"digest": node.applied_digest},
                after={"digest": digest, "revision": revision},
            )
        return node

    async def update_labels(self, node_id: str, labels: Mapping[str, str]) -> tuple[Node, int]:
        labels = validate_labels(labels)
        async with self.store.write() as tx:
            node = await tx.nodes.get(node_id)
            if node is None:
                raise NotFound(f"node {node_id!r} does not exist", field="node_id")
            revision = 0
            if dict(node.labels) != labels or not node.labels_by_operator:
                # From now on the operator's: an Envoy's node.metadata no longer changes them.
                await tx.nodes.set_labels(node_id, labels, by_operator=True)
            if dict(node.labels) != labels:
                revision = await self._write_labels(tx, node.project, node_id, labels)
                await refresh_routes(tx, node.project, self.clock(), affects=_matching(node.labels, labels))
                await tx.audit.record(
                    "node.relabel",
                    f"node/{node_id}",
                    project=node.project,
                    before={"labels": dict(node.labels)},
                    after={"labels": labels, "revision": revision},
                )
            updated = await tx.nodes.get(node_id)
        assert updated is not None
        # Read-your-writes: the answer (and a GetNode right after) shows the new routing.
        await self.view.wait_until(None, revision, READ_YOUR_WRITES)
        async with self.store.read() as tx:
            [updated] = await self._flag_revoked(tx, updated.project, [updated])
        return updated, revision

    async def xds_record(self, node_id: str) -> XdsRecord | None:
        """What the xDS node had acknowledged at its last ACTIVE or FAILED report."""
        async with self.store.read() as tx:
            return await tx.nodes.xds(node_id)

    async def get(self, node_id: str) -> Node:
        async with self.store.read() as tx:
            node = await tx.nodes.get(node_id)
            if node is None:
                raise NotFound(f"node {node_id!r} does not exist", field="node_id")
            [node] = await self._flag_revoked(tx, node.project, [node])
        return node

    async def page(
        self, project: str, selector: str, status: NodeStatus | None, page_size: int, page_token: str
    ) -> tuple[list[Node], str]:
        limit = validation.page_size(page_size)
        parsed = Selector.parse(selector) if selector else None
        after = validation.decode_page_token(page_token)
        async with self.store.read() as tx:
            await require_project(tx, project)
            nodes = await tx.nodes.page(project, parsed, status, limit + 1, after)
            next_token = validation.encode_page_token(nodes[limit - 1].id) if len(nodes) > limit else ""
            return await self._flag_revoked(tx, project, nodes[:limit]), next_token

    async def _flag_revoked(self, tx: Tx, project: str, nodes: list[Node]) -> list[Node]:
        """`nodes` with the revocation reason of the bundle each runs or is assigned, so an
        operator sees at a glance which nodes still serve a revoked bundle."""
        desired = {n.id: self.view.effective(n.id) for n in nodes}
        digests = {n.applied_digest for n in nodes}
        digests.update(d.digest for d in desired.values() if d is not None)
        reasons = await tx.bundles.revoke_reasons(project, digests)
        if not reasons:
            return nodes
        flagged = []
        for n in nodes:
            want = desired[n.id]
            flagged.append(
                replace(
                    n,
                    applied_revoked_reason=reasons.get(n.applied_digest, ""),
                    desired_revoked_reason=reasons.get(want.digest, "") if want is not None else "",
                )
            )
        return flagged

    async def heartbeats(self, node_id: str) -> list[HeartbeatRecord]:
        async with self.store.read() as tx:
            if await tx.nodes.get(node_id) is None:
                raise NotFound(f"node {node_id!r} does not exist", field="node_id")
            return await tx.nodes.heartbeats(node_id)

    def desired(self, node_id: str) -> DesiredRow | None:
        return self.view.effective(node_id)

    async def mark_offline(self, offline_after: timedelta) -> list[str]:
        """Mark nodes whose last heartbeat is older than `offline_after` offline."""
        now = self.clock()
        async with self.store.write() as tx:
            marked = await tx.nodes.mark_offline(now - offline_after)
            for node_id, project in marked:
                await tx.audit.record("node.offline", f"node/{node_id}", project=project)
                await tx.notify.emit(
                    NotificationEvent(
                        project,
                        NotifyKind.NODE_OFFLINE,
                        f"node/{node_id}",
                        f"node {node_id} offline: no heartbeat for {offline_after.total_seconds():g}s",
                        now,
                        {"node": node_id},
                    )
                )
        return [node_id for node_id, _ in marked]

    async def _write_labels(self, tx: Tx, project: str, node_id: str, labels: Mapping[str, str]) -> int:
        revision = await tx.desired.allocate_revision()
        row = DesiredRow(
            key=meta_key(node_id),
            revision=revision,
            project=project,
            kind=ChangeKind.NODE,
            labels=dict(labels),
            written_at=self.clock().timestamp(),
        )
        await tx.desired.append([row])
        tx.after_commit(self.notify)
        return revision


def _matching(before: Mapping[str, str], after: Mapping[str, str]) -> Callable[[Router], bool]:
    """The routers whose selector a node matched before or matches after a change."""

    def affects(router: Router) -> bool:
        selector = Selector.parse(router.selector)
        return selector.matches(before) or selector.matches(after)

    return affects


async def _assignment_keys(tx: Tx, node: Node, selectors: dict[str, list[str]]) -> list[str]:
    """The keys that may have assigned `node` a bundle; `selectors`: the selector keys
    of each project read so far in this transaction."""
    keys = [node_key(node.id)]
    found = selectors.get(node.project)
    if found is None:
        found = selectors[node.project] = await tx.desired.selector_keys(node.project)
    for key in found:
        selector = Selector.parse(key.split(":", 2)[2])
        if selector.matches(node.labels):
            keys.append(key)
    return keys


_PHASE_ORDER = {ReportPhase.DOWNLOADED: 0, ReportPhase.ACTIVE: 1, ReportPhase.FAILED: 1}


_Report = tuple[str, StatusReport]


def _after(node: Node, report: StatusReport) -> Node:
    """The node as recording `report` leaves it, for the checks of a later report."""
    if report.phase is ReportPhase.ACTIVE:
        return replace(
            node, last_report=report, applied_digest=report.digest, applied_revision=report.revision
        )
    if report.phase is ReportPhase.FAILED:
        return replace(node, last_report=report, failed_digest=report.digest, failed_revision=report.revision)
    return replace(node, last_report=report)


def _is_stale(last: StatusReport, new: StatusReport) -> bool:
    """A report that does not move the node forward: older revision or earlier phase."""
    return (new.revision, _PHASE_ORDER[new.phase]) <= (last.revision, _PHASE_ORDER[last.phase])


# What a heartbeat's metrics may hold, inclusive; a value outside (or NaN, or infinite)
# refuses the beat. The reference agent keeps a copy (agent_stub.heartbeat.METRIC_BOUNDS:
# it may not import the domain) to drop a bad value instead of losing the beat, and
# tests/unit/test_agent_metrics.py fails when the two differ: change both together.
METRIC_BOUNDS = {
    "error_rate": (0.0, 1.0),
    "p99_latency_ms": (0.0, 3.6e6),
    "cpu_percent": (0.0, 100.0),
    "memory_percent": (0.0, 100.0),
    "requests_per_second": (0.0, 1e9),
}


def _check_metrics(m: NodeMetrics) -> None:
    """Reported values must be in range; an absent one (None) is simply not reported.
    The refusal names the field (`metrics.error_rate: nan is outside [0.0, 1.0]`) so an
    agent's operator can tell which of its metrics is wrong."""
    for name, (low, high) in METRIC_BOUNDS.items():
        if (value := getattr(m, name)) is not None:
            validation.bounded(value, low, high, f"metrics.{name}")


def _relabels(node: Node, labels: Mapping[str, str] | None) -> bool:
    """Whether the labels an Envoy's metadata gives on a later contact replace `node`'s:
    only when the server takes them from metadata (`labels` given), they differ, and no
    operator has set the node's labels since."""
    return labels is not None and not node.labels_by_operator and dict(node.labels) != dict(labels)


def _contact_changes(node: Node, labels: Mapping[str, str] | None, agent_version: str) -> bool:
    return _relabels(node, labels) or (bool(agent_version) and agent_version != node.agent_version)


def _unclaimed(node: Node, now: datetime) -> bool:
    """Registered recently and never heard from: its credential never reached it."""
    silent = node.last_heartbeat is None and node.last_report is None
    return silent and now - node.registered_at < UNCLAIMED_WINDOW
