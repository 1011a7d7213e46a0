"""Node identity: enrollment tokens, the credential-for-token exchange, what a node token
may do, re-registration, revocation and signing key rotation; on both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import jwt
import pytest
from google.protobuf.duration_pb2 import Duration
from sqlalchemy import update

from controlplane.api.bundle.v1 import bundle_pb2 as bpb
from controlplane.api.identity.v1 import identity_pb2 as ipb
from controlplane.api.node.v1 import node_pb2 as npb
from controlplane.api.watch.v1 import watch_pb2 as wpb
from controlplane.domain.identity.node_tokens import generate_private_pem
from controlplane.store.schema import enrollment_tokens
from tests.conftest import HarnessFactory
from tests.support.harness import Harness, Registered, auth


async def code_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def heartbeat(
    h: Harness, node: Registered, metadata: tuple[tuple[str, str], ...] | None = None
) -> grpc.StatusCode:
    return await code_of(
        h.nodes.Heartbeat(npb.HeartbeatRequest(node_id=node.node_id), metadata=metadata or node.metadata)
    )


async def register_raw(
    h: Harness, name: str, token: str | None = None, credential: str = ""
) -> npb.RegisterNodeResponse | grpc.StatusCode:
    try:
        return await h.nodes.RegisterNode(
            npb.RegisterNodeRequest(project="default", enrollment_token=token or h.token, name=name),
            metadata=auth(credential) if credential else None,
        )
    except grpc.aio.AioRpcError as e:
        return e.code()


async def test_a_token_names_its_node_and_is_signed(harness: Harness) -> None:
    node = await harness.register("edge-1")
    header = jwt.get_unverified_header(node.token)
    claims = jwt.decode(node.token, options={"verify_signature": False})
    assert header["alg"] == "EdDSA" and header["kid"] == harness.app.tokens.keyring.signing_kid
    assert claims["sub"] == node.node_id and claims["prj"] == "default"
    assert claims["iss"] == "controlplane" and claims["aud"] == "controlplane-node"
    assert 0 < claims["exp"] - claims["iat"] <= 15 * 60
    assert await heartbeat(harness, node) == grpc.StatusCode.OK


async def test_the_credential_only_buys_tokens(harness: Harness) -> None:
    node = await harness.register("edge-1")
    # The long-lived credential is refused everywhere but IssueNodeToken...
    assert await heartbeat(harness, node, auth(node.credential)) == grpc.StatusCode.UNAUTHENTICATED
    # ...which only issues tokens for the credential's own node.
    other = await harness.register("edge-2")
    wrong_node = harness.identity.IssueNodeToken(
        ipb.IssueNodeTokenRequest(node_id=other.node_id), metadata=auth(node.credential)
    )
    assert await code_of(wrong_node) == grpc.StatusCode.PERMISSION_DENIED
    forged = harness.identity.IssueNodeToken(
        ipb.IssueNodeTokenRequest(node_id=node.node_id), metadata=auth(node.node_id + ".cpn_forged")
    )
    assert await code_of(forged) == grpc.StatusCode.UNAUTHENTICATED


async def test_a_node_acts_only_for_itself(harness: Harness) -> None:
    me, other = await harness.register("me"), await harness.register("other")
    for call in (
        harness.nodes.Heartbeat(npb.HeartbeatRequest(node_id=other.node_id), metadata=me.metadata),
        harness.nodes.ReportStatus(npb.ReportStatusRequest(node_id=other.node_id), metadata=me.metadata),
        harness.bundles.DownloadBundle(
            bpb.DownloadBundleRequest(project="another"), metadata=me.metadata
        ).read(),
        harness.watch.WatchBundles(
            wpb.WatchBundlesRequest(node_id=other.node_id), metadata=me.metadata
        ).read(),
        harness.nodes.GetNode(npb.GetNodeRequest(node_id=me.node_id), metadata=me.metadata),
        harness.identity.RevokeNode(ipb.RevokeNodeRequest(node_id=other.node_id), metadata=me.metadata),
    ):
        assert await code_of(call) == grpc.StatusCode.PERMISSION_DENIED


async def test_tampered_tokens_are_refused(harness: Harness) -> None:
    node, other = await harness.register("edge-1"), await harness.register("edge-2")
    header, payload, signature = node.token.split(".")
    other_payload = other.token.split(".")[1]
    for forged in (
        f"{header}.{other_payload}.{signature}",
        f"{header}.{payload}.{signature[:-4]}AAAA",
        "eyJ.x.y",
    ):
        assert await heartbeat(harness, node, auth(forged)) == grpc.StatusCode.UNAUTHENTICATED


async def test_revoking_a_node_ends_its_stream_and_its_tokens(harness: Harness) -> None:
    node = await harness.register("edge-1", {"env": "prod"})
    stream = harness.open_watch(node)
    await stream.wait_for(lambda r: "snapshot_end" in r.kinds, what="bootstrap")
    reply = await harness.identity.RevokeNode(ipb.RevokeNodeRequest(node_id=node.node_id))
    assert reply.revision > 0
    await stream.ended.wait()
    assert stream.error is not None and stream.error.code() == grpc.StatusCode.UNAUTHENTICATED
    # The token is dead at once on this replica, and the credential buys no new one.
    assert await heartbeat(harness, node) == grpc.StatusCode.UNAUTHENTICATED
    exchange = harness.identity.IssueNodeToken(
        ipb.IssueNodeTokenRequest(node_id=node.node_id), metadata=auth(node.credential)
    )
    assert await code_of(exchange) == grpc.StatusCode.UNAUTHENTICATED
    # Its name is barred: holding the enrollment token does not bring a revoked node back...
    assert await register_raw(harness, "edge-1") == grpc.StatusCode.PERMISSION_DENIED
    # ...until an admin allows it; then the enrollment token alone re-enrolls it, same id.
    await harness.identity.RevokeNode(ipb.RevokeNodeRequest(node_id=node.node_id, allow_reenroll=True))
    again = await register_raw(harness, "edge-1")
    assert isinstance(again, npb.RegisterNodeResponse) and again.node_id == node.node_id
    fresh = Registered(again.node_id, again.node_credential, await harness.node_token(again))
    assert await heartbeat(harness, fresh) == grpc.StatusCode.OK
    assert await heartbeat(harness, node) == grpc.StatusCode.UNAUTHENTICATED
    async with harness.app.store.read() as tx:
        actions = [e.action async for e in tx.audit.entries() if e.resource == f"node/{node.node_id}"]
    assert actions == ["node.register", "node.revoke", "node.revoke", "node.reregister", "node.online"]


async def test_registering_a_live_name_needs_its_credential(harness: Harness) -> None:
    first = await register_raw(harness, "edge-1")
    assert isinstance(first, npb.RegisterNodeResponse)
    node = Registered(first.node_id, first.node_credential, await harness.node_token(first))
    assert await heartbeat(harness, node) == grpc.StatusCode.OK  # the node is live
    # Holding the project's enrollment token is not enough to take the name over.
    assert await register_raw(harness, "edge-1") == grpc.StatusCode.ALREADY_EXISTS
    wrong = first.node_id + ".cpn_guess"
    assert await register_raw(harness, "edge-1", credential=wrong) == grpc.StatusCode.ALREADY_EXISTS
    assert await heartbeat(harness, node) == grpc.StatusCode.OK
    # The node itself, presenting its credential, rotates it; the old tokens die.
    second = await register_raw(harness, "edge-1", credential=first.node_credential)
    assert isinstance(second, npb.RegisterNodeResponse) and second.node_id == first.node_id
    assert await heartbeat(harness, node) == grpc.StatusCode.UNAUTHENTICATED
    rotated = Registered(second.node_id, second.node_credential, await harness.node_token(second))
    assert await heartbeat(harness, rotated) == grpc.StatusCode.OK


async def test_enrollment_tokens_run_out_expire_and_are_revoked(harness: Harness) -> None:
    once = await harness.identity.CreateEnrollmentToken(
        ipb.CreateEnrollmentTokenRequest(project="default", max_uses=1)
    )
    assert once.token.uses_left == 1
    assert isinstance(await register_raw(harness, "a", once.secret), npb.RegisterNodeResponse)
    assert await register_raw(harness, "b", once.secret) == grpc.StatusCode.UNAUTHENTICATED

    timed = await harness.identity.CreateEnrollmentToken(
        ipb.CreateEnrollmentTokenRequest(project="default", ttl=Duration(seconds=3600))
    )
    assert isinstance(await register_raw(harness, "c", timed.secret), npb.RegisterNodeResponse)
    past = datetime.now(UTC) - timedelta(seconds=1)
    async with harness.app.engine.begin() as conn:
        await conn.execute(
            update(enrollment_tokens)
            .where(enrollment_tokens.c.token_hash.like(f"{timed.token.id}%"))
            .values(expires_at=past)
        )
    assert await register_raw(harness, "d", timed.secret) == grpc.StatusCode.UNAUTHENTICATED

    revoked = await harness.identity.CreateEnrollmentToken(
        ipb.CreateEnrollmentTokenRequest(project="default")
    )
    await harness.identity.RevokeEnrollmentToken(
        ipb.RevokeEnrollmentTokenRequest(project="default", token_id=revoked.token.id)
    )
    assert await register_raw(harness, "e", revoked.secret) == grpc.StatusCode.UNAUTHENTICATED
    listed = await harness.identity.ListEnrollmentTokens(ipb.ListEnrollmentTokensRequest(project="default"))
    by_id = {t.id: t for t in listed.tokens}
    assert by_id[once.token.id].uses_left == 0
    assert by_id[revoked.token.id].HasField("revoked_at")
    assert not by_id[timed.token.id].HasField("uses_left")
    async with harness.app.store.read() as tx:
        actions = [e.action async for e in tx.audit.entries() if e.resource.startswith("enrollment_token/")]
    assert actions == ["enrollment_token.create"] * 3 + ["enrollment_token.revoke"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"project": "nope"}, "project"),
        ({"project": "default", "max_uses": -1}, "max_uses"),
        ({"project": "default", "ttl": Duration(seconds=5)}, "ttl"),
    ],
)
async def test_bad_enrollment_token_requests(harness: Harness, fields: dict[str, object], field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await harness.identity.CreateEnrollmentToken(ipb.CreateEnrollmentTokenRequest(**fields))  # type: ignore[arg-type]
    assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert field in (e.value.details() or "")


async def test_revocation_and_tokens_survive_a_restart(make_harness: HarnessFactory) -> None:
    first = await make_harness()
    kept, revoked = await first.register("kept"), await first.register("revoked")
    await first.identity.RevokeNode(ipb.RevokeNodeRequest(node_id=revoked.node_id, allow_reenroll=True))
    await first.register("revoked")  # re-enrolled: its meta row is no longer the REVOKED one
    await first.close()
    await first.app.stop()
    second = await make_harness()
    # Tokens are checked without the database: the old one still works after a restart,
    # and the one issued before the revocation stays dead.
    assert await heartbeat(second, kept) == grpc.StatusCode.OK
    assert await heartbeat(second, revoked) == grpc.StatusCode.UNAUTHENTICATED


async def test_signing_key_rotation_keeps_old_tokens_for_their_life(
    make_harness: HarnessFactory,
) -> None:
    first = await make_harness()
    old_key = first.app.settings.data_dir / "token-signing-key.pem"
    node = await first.register("edge-1")
    await first.close()
    await first.app.stop()
    rotated = await make_harness(
        token_signing_key=generate_private_pem().decode(), token_verify_keys=(str(old_key),)
    )
    assert rotated.app.tokens.keyring.signing_kid != jwt.get_unverified_header(node.token)["kid"]
    assert await heartbeat(rotated, node) == grpc.StatusCode.OK
    fresh = await rotated.node_token(node)
    assert jwt.get_unverified_header(fresh)["kid"] == rotated.app.tokens.keyring.signing_kid
    await rotated.close()
    await rotated.app.stop()
    # Once the old key is dropped, its tokens are refused.
    dropped = await make_harness(token_signing_key=generate_private_pem().decode())
    assert await heartbeat(dropped, node) == grpc.StatusCode.UNAUTHENTICATED


async def test_a_registration_whose_answer_was_lost_can_be_repeated(harness: Harness) -> None:
    """RegisterNode committed but the agent never got the answer (a timeout): it was never
    heard from, so the enrollment token alone may enroll the name again, same id."""
    lost = await register_raw(harness, "edge-1")
    assert isinstance(lost, npb.RegisterNodeResponse)
    again = await register_raw(harness, "edge-1")
    assert isinstance(again, npb.RegisterNodeResponse) and again.node_id == lost.node_id
    node = Registered(again.node_id, again.node_credential, await harness.node_token(again))
    assert await heartbeat(harness, node) == grpc.StatusCode.OK
    # Once heard from, the name is claimed.
    assert await register_raw(harness, "edge-1") == grpc.StatusCode.ALREADY_EXISTS
