"""The whole authorization matrix: every RPC of every service, each with a valid request
against resources made for it (`tests/support/matrix.py`), called by every kind of
caller, and each answer checked exactly:

- UNAUTHENTICATED: no credential, an expired or revoked API key, an expired node token, a
  token signed by a key the server does not know, a node credential anywhere but
  IssueNodeToken (and anything but a node credential there);
- PERMISSION_DENIED: a node calling operator RPCs or acting for another node, an API key
  calling node RPCs, a role below the rule's, a key of another project, a project key on
  a global operation;
- OK: everyone else — the call was served, not merely let through (a stream counts once
  its first message is in hand).

The expected answer of each cell is derived from `auth.POLICY`; a handful of critical
cells are also written down here by hand, so that a wrong edit of the table fails too.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta
from functools import partial

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from controlplane.rpc.auth import POLICY, ROLE_FOR, Rule
from controlplane.rpc.ratelimit import RateLimit, RateLimits
from tests.conftest import HarnessFactory
from tests.support.harness import Harness
from tests.support.identities import callers
from tests.support.matrix import CASES, Caller, Case, Kind, Request, World, world
from tests.support.rpcs import Rpc, all_rpcs, answer, unless_lost

OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
_OFF = RateLimit(0, 0)
# The matrix is about authorization: rate limits (tested on their own) stay out of it.
NO_LIMITS = RateLimits(operator=_OFF, node=_OFF, anonymous=_OFF, watch=_OFF)

# Written down by hand, not derived from POLICY: (RPC, caller) -> answer.
CRITICAL = {
    ("CreateRollout", "reader"): DENIED,
    ("CreateRollout", "operator"): OK,
    ("CreateRollout", "other-project-admin"): DENIED,
    ("ListNodes", "node"): DENIED,
    ("ListNodes", "none"): UNAUTHENTICATED,
    ("ListNodes", "expired-key"): UNAUTHENTICATED,
    ("ListNodes", "revoked-key"): UNAUTHENTICATED,
    ("ListNodes", "node-credential"): UNAUTHENTICATED,
    ("GetNode", "reader"): OK,
    ("GetNode", "other-project-admin"): DENIED,
    ("CreateApiKey", "admin"): OK,
    ("CreateApiKey[admin grant]", "operator"): DENIED,
    ("CreateApiKey[admin grant]", "other-project-admin"): DENIED,
    ("RevokeApiKey", "other-project-admin"): DENIED,
    ("CreateProject", "admin"): DENIED,
    ("CreateProject", "global-admin"): OK,
    ("ListProjects", "reader"): DENIED,
    ("UpdateProjectPolicy", "reader"): DENIED,
    ("UpdateProjectPolicy", "operator"): DENIED,
    ("UpdateProjectPolicy", "other-project-admin"): DENIED,
    ("UpdateProjectPolicy", "admin"): OK,
    ("UpdateProjectPolicy", "global-admin"): OK,
    ("VerifyAuditChain", "admin"): DENIED,
    ("RetireSigningKey", "admin"): DENIED,
    ("DeleteFreezeWindow", "operator"): DENIED,
    ("SetValidationConfig", "operator"): DENIED,
    ("CancelRollout", "operator"): OK,
    ("ApproveRollout", "node"): DENIED,
    ("RegisterNode", "none"): OK,
    ("Heartbeat", "node"): OK,
    ("Heartbeat", "other-node"): DENIED,
    ("Heartbeat", "admin"): DENIED,
    ("ReportStatus", "other-node"): DENIED,
    ("WatchBundles", "node"): OK,
    ("WatchBundles", "other-node"): DENIED,
    ("WatchBundles", "global-admin"): DENIED,
    ("WatchBundles", "expired-token"): UNAUTHENTICATED,
    ("WatchBundles", "unknown-key-token"): UNAUTHENTICATED,
    ("DownloadBundle", "node"): OK,
    ("DownloadBundle", "other-project-reader"): DENIED,
    ("IssueNodeToken", "node-credential"): OK,
    ("IssueNodeToken", "node"): UNAUTHENTICATED,
    ("IssueNodeToken", "global-admin"): UNAUTHENTICATED,
    ("RevokeNode", "operator"): DENIED,
}


def expected(rule: Rule, caller: Caller, case: Case, request: Request) -> grpc.StatusCode:
    """The answer `auth.POLICY` implies for this cell."""
    if rule is Rule.PUBLIC:
        return OK
    if caller.kind in (Kind.NONE, Kind.INVALID):
        return UNAUTHENTICATED
    if rule is Rule.NODE_CREDENTIAL:
        # Only the credential is accepted here, and nowhere else.
        return OK if caller.kind is Kind.NODE_CREDENTIAL else UNAUTHENTICATED
    if caller.kind is Kind.NODE_CREDENTIAL:
        return UNAUTHENTICATED
    if caller.kind is Kind.NODE:
        if rule not in (Rule.NODE, Rule.NODE_OR_READ):
            return DENIED
        named = getattr(request, "node_id", "") if not isinstance(request, list) else ""
        return DENIED if named and named != caller.node_id else OK
    if rule is Rule.NODE:
        return DENIED
    role = caller.role_in(case.project)
    return OK if role is not None and role >= ROLE_FOR[rule] else DENIED


async def test_every_rpc_by_every_caller(make_harness: HarnessFactory) -> None:
    h = await make_harness(rate_limits=NO_LIMITS, rollout_tick=timedelta(seconds=0.1))
    w = await world(h)
    try:
        await check_matrix(h, w)
    finally:
        await w.close()


@dataclass
class Prepared:
    """A case's requests, and the answer each caller must get."""

    case: Case
    rpc: Rpc
    shared: Request
    wants: dict[str, grpc.StatusCode]
    served: list[Caller]
    built: list[Request]


async def check_matrix(h: Harness, w: World) -> None:
    rpcs = {r.name: r for r in all_rpcs()}
    unmatched = {c.rpc for c in CASES} ^ set(rpcs)
    assert not unmatched, f"every RPC needs a case in tests/support/matrix.py, and only RPCs: {unmatched}"
    missing = [r.path for r in rpcs.values() if r.path not in POLICY]
    assert not missing, f"RPCs without a rule: {missing}"
    labels = {c.label for c in CASES}
    assert {rpc for rpc, _ in CRITICAL} <= labels and {who for _, who in CRITICAL} <= set(w.callers)

    wrong: list[str] = []
    seen: dict[grpc.StatusCode, int] = {}
    # A bare channel: the harness's own signs credential-less calls as its admin.
    async with grpc.aio.insecure_channel(h.address) as channel:

        async def cell(case: Case, rpc: Rpc, caller: Caller, want: grpc.StatusCode, request: Request) -> None:
            name = f"{case.label} x {caller.name}"
            written = CRITICAL.get((case.label, caller.name))
            if written is not None and written != want:
                wrong.append(f"{name}: POLICY implies {want.name}, but it must be {written.name}")
            got = await unless_lost(rpc, partial(answer, channel, rpc, request, metadata=caller.metadata))
            seen[got.code] = seen.get(got.code, 0) + 1
            if got.code is not want:
                wrong.append(f"{name}: expected {want.name}, got {got.code.name} ({got.details})")
            elif want is OK and got.reply is None:
                wrong.append(f"{name}: OK, but no {describe(rpc)} arrived")

        async def prepare(case: Case) -> Prepared:
            # Denied cells share one request; a cell meant to succeed on a target it uses
            # up gets a target of its own, all made at once (a rollout's waits overlap).
            rpc = rpcs[case.rpc]
            shared = await case.build(w)
            wants = {c.name: expected(POLICY[rpc.path], c, case, shared) for c in w.callers.values()}
            served = [c for c in w.callers.values() if wants[c.name] is OK]
            built = (
                list(await asyncio.gather(*(case.build(w) for _ in served)))
                if case.fresh
                else [shared] * len(served)
            )
            return Prepared(case, rpc, shared, wants, served, built)

        # The next case's requests are made while this case's calls go: each case's
        # targets are its own, and no call of one case acts on what the next one makes.
        upcoming = asyncio.create_task(prepare(CASES[0]))
        try:
            for i in range(len(CASES)):
                p = await upcoming
                if i + 1 < len(CASES):
                    upcoming = asyncio.create_task(prepare(CASES[i + 1]))
                # Refusals change nothing: they go at once. Calls meant to succeed go one by one,
                # as a client would make them.
                await asyncio.gather(
                    *(
                        cell(p.case, p.rpc, c, p.wants[c.name], p.shared)
                        for c in w.callers.values()
                        if c not in p.served
                    )
                )
                for caller, request in zip(p.served, p.built, strict=True):
                    await cell(p.case, p.rpc, caller, OK, request)
        finally:
            upcoming.cancel()  # a case that failed leaves none pending
    assert not wrong, f"{len(wrong)} wrong cell(s):\n" + "\n".join(wrong)
    # Every caller was tried on every case, and each verdict really happened.
    assert sum(seen.values()) == len(CASES) * len(w.callers)
    assert seen.keys() == {OK, UNAUTHENTICATED, DENIED}, seen


def describe(rpc: Rpc) -> str:
    return "first message" if rpc.server_streaming else "response"


async def test_health_and_reflection_stay_open(harness: Harness) -> None:
    c = await callers(harness)
    async with grpc.aio.insecure_channel(harness.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        for caller, metadata in c.by_name.items():
            reply = await health.Check(health_pb2.HealthCheckRequest(), metadata=metadata)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, caller
            ask = reflection_pb2.ServerReflectionRequest(list_services="")
            answers = [a async for a in reflection.ServerReflectionInfo(iter([ask]), metadata=metadata)]
            names = {s.name for s in answers[0].list_services_response.service}
            assert "controlplane.identity.v1.IdentityService" in names, caller
