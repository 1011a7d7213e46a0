"""Operator API keys: the first-start admin key, minting (never more power than the
minting key), listing, expiry, revocation, and project boundaries; on both databases."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from sqlalchemy import select, update

from controlplane.api.bundle.v1 import bundle_pb2 as bpb
from controlplane.api.identity.v1 import identity_pb2 as ipb
from controlplane.api.node.v1 import node_pb2 as npb
from controlplane.api.project.v1 import project_pb2 as ppb
from controlplane.bootstrap import App
from controlplane.domain.identity.api_keys import ApiKeyRegistry
from controlplane.domain.kernel.clock import utcnow
from controlplane.domain.kernel.errors import FailedPrecondition
from controlplane.domain.model.roles import Role
from controlplane.firststart import ADMIN_KEY_FILE
from controlplane.store.engine import make_engine, upgrade
from controlplane.store.schema import api_keys
from controlplane.store.sql import SqlStore
from tests.conftest import HarnessFactory, fast_settings
from tests.support.harness import Harness, auth

READER, OPERATOR, ADMIN = ipb.ROLE_READER, ipb.ROLE_OPERATOR, ipb.ROLE_ADMIN


async def code_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def key_id(secret: str) -> str:
    return secret.split("_")[1]


async def test_first_start_makes_one_admin_key_kept_for_the_owner_only(make_harness: HarnessFactory) -> None:
    h = await make_harness()
    path = h.app.settings.data_dir / "admin-key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert h.admin_key.startswith("cpk_")
    keys = await h.identity.ListApiKeys(ipb.ListApiKeysRequest())
    assert [(k.id, [(g.project, g.role) for g in k.grants]) for k in keys.keys] == [
        (key_id(h.admin_key), [("*", ADMIN)])
    ]
    assert keys.keys[0].created_by == "system:first-start"
    # Only its hash is stored.
    async with h.app.engine.connect() as conn:
        row = (await conn.execute(select(api_keys))).one()
    assert h.admin_key not in str(tuple(row))
    # A second start makes no other key and prints none.
    await h.close()
    await h.app.stop()
    again = await make_harness()
    assert (await again.identity.ListApiKeys(ipb.ListApiKeysRequest())).keys[0].id == key_id(h.admin_key)
    assert len((await again.identity.ListApiKeys(ipb.ListApiKeysRequest())).keys) == 1


async def test_a_key_works_until_revoked(harness: Harness) -> None:
    secret = await harness.api_key({"default": READER}, name="ci")
    listing = harness.nodes.ListNodes(npb.ListNodesRequest(project="default"), metadata=auth(secret))
    assert await code_of(listing) == grpc.StatusCode.OK
    revoked = await harness.identity.RevokeApiKey(ipb.RevokeApiKeyRequest(key_id=key_id(secret)))
    assert revoked.key.HasField("revoked_at")
    again = harness.nodes.ListNodes(npb.ListNodesRequest(project="default"), metadata=auth(secret))
    assert await code_of(again) == grpc.StatusCode.UNAUTHENTICATED
    listed = await harness.identity.ListApiKeys(ipb.ListApiKeysRequest(project="default"))
    assert key_id(secret) not in {k.id for k in listed.keys}
    everything = await harness.identity.ListApiKeys(ipb.ListApiKeysRequest(include_revoked=True))
    assert key_id(secret) in {k.id for k in everything.keys}
    async with harness.app.store.read() as tx:
        actions = [e.action async for e in tx.audit.entries() if e.resource == f"apikey/{key_id(secret)}"]
    assert actions == ["apikey.create", "apikey.revoke"]


async def test_expired_and_forged_keys_are_refused(harness: Harness) -> None:
    secret = await harness.api_key({"default": READER}, ttl=Duration(seconds=3600))
    async with harness.app.engine.begin() as conn:
        await conn.execute(
            update(api_keys)
            .where(api_keys.c.id == key_id(secret))
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    for bad in (secret, secret[:-3] + "xyz", "cpk_0000000000000000_nope", "cpk_short"):
        call = harness.nodes.ListNodes(npb.ListNodesRequest(project="default"), metadata=auth(bad))
        assert await code_of(call) == grpc.StatusCode.UNAUTHENTICATED, bad


async def test_no_key_mints_a_key_with_more_power(harness: Harness) -> None:
    await harness.projects.CreateProject(ppb.CreateProjectRequest(name="other"))
    admin = await harness.api_key({"default": ADMIN}, ttl=Duration(seconds=3600))
    operator = await harness.api_key({"default": OPERATOR})

    async def mint(by: str, grants: dict[str, int], ttl: int = 0) -> grpc.StatusCode:
        request = ipb.CreateApiKeyRequest(
            name="minted",
            grants=[ipb.Grant(project=p, role=r) for p, r in grants.items()],  # type: ignore[arg-type]
        )
        if ttl:
            request.ttl.seconds = ttl
        return await code_of(harness.identity.CreateApiKey(request, metadata=auth(by)))

    denied = grpc.StatusCode.PERMISSION_DENIED
    assert await mint(operator, {"default": READER}) == denied  # minting is an admin's act
    assert await mint(admin, {"*": READER}) == denied  # every project: only a global admin
    assert await mint(admin, {"other": READER}) == denied  # another project
    assert await mint(admin, {"default": READER, "other": READER}) == denied
    assert await mint(admin, {"default": ADMIN}) == denied  # 90 days would outlive the minter's hour
    assert await mint(admin, {"default": ADMIN}, ttl=1800) == grpc.StatusCode.OK
    assert await mint(harness.admin_key, {"*": READER, "other": ADMIN}) == grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("grants", "name", "field"),
    [
        ([], "k", "grants"),
        ([ipb.Grant(project="default")], "k", "grants[0].role"),
        ([ipb.Grant(project="Bad Name", role=READER)], "k", "grants[0].project"),
        ([ipb.Grant(project="nope", role=READER)], "k", "grants[0].project"),
        ([ipb.Grant(project="default", role=READER)] * 2, "k", "grants[1].project"),
        ([ipb.Grant(project="default", role=READER)], "", "name"),
        ([ipb.Grant(project="default", role=READER)], "x" * 101, "name"),
    ],
)
async def test_bad_key_requests_name_the_field(
    harness: Harness, grants: list[ipb.Grant], name: str, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await harness.identity.CreateApiKey(ipb.CreateApiKeyRequest(name=name, grants=grants))
    assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert (e.value.details() or "").startswith(field), e.value.details()
    listed = await harness.identity.ListApiKeys(ipb.ListApiKeysRequest())
    assert len(listed.keys) == 1  # nothing half-made


async def test_a_project_key_stays_in_its_project(harness: Harness) -> None:
    await harness.projects.CreateProject(ppb.CreateProjectRequest(name="other"))
    theirs = await harness.register("theirs", project="other", token=await _token(harness, "other"))
    mine = await harness.register("mine")
    key = auth(await harness.api_key({"default": OPERATOR}))
    denied = grpc.StatusCode.PERMISSION_DENIED
    for call in (
        harness.nodes.GetNode(npb.GetNodeRequest(node_id=theirs.node_id), metadata=key),
        harness.nodes.ListNodes(npb.ListNodesRequest(project="other"), metadata=key),
        harness.nodes.UpdateNodeLabels(npb.UpdateNodeLabelsRequest(node_id=theirs.node_id), metadata=key),
        harness.bundles.ListBundles(bpb.ListBundlesRequest(project="other"), metadata=key),
        harness.bundles.AssignBundle(bpb.AssignBundleRequest(project="other"), metadata=key),
        harness.projects.GetProject(ppb.GetProjectRequest(name="other"), metadata=key),
        harness.projects.ListProjects(ppb.ListProjectsRequest(), metadata=key),
    ):
        assert await code_of(call) == denied
    assert await code_of(harness.nodes.GetNode(npb.GetNodeRequest(node_id=mine.node_id), metadata=key)) == (
        grpc.StatusCode.OK
    )
    # An id that names nothing is NOT_FOUND to anyone who may read, not a leak.
    missing = harness.nodes.GetNode(npb.GetNodeRequest(node_id="n-nope"), metadata=key)
    assert await code_of(missing) == grpc.StatusCode.NOT_FOUND


async def _token(h: Harness, project: str) -> str:
    reply = await h.identity.CreateEnrollmentToken(ipb.CreateEnrollmentTokenRequest(project=project))
    return reply.secret


async def test_a_listing_shows_only_the_grants_the_caller_administers(harness: Harness) -> None:
    for name in ("other", "third"):
        await harness.projects.CreateProject(ppb.CreateProjectRequest(name=name))
    spread = await harness.api_key({"default": READER, "other": OPERATOR, "third": READER}, name="spread")
    default_admin = auth(await harness.api_key({"default": ADMIN}, name="default admin"))
    two_admin = auth(await harness.api_key({"default": ADMIN, "other": ADMIN}, name="two admin"))

    async def grants_seen(metadata: tuple[tuple[str, str], ...] | None) -> list[tuple[str, int]]:
        listed = await harness.identity.ListApiKeys(
            ipb.ListApiKeysRequest(project="default"), metadata=metadata
        )
        found = next(k for k in listed.keys if k.id == key_id(spread))
        return [(g.project, g.role) for g in found.grants]

    assert await grants_seen(default_admin) == [("default", READER)]
    assert await grants_seen(two_admin) == [("default", READER), ("other", OPERATOR)]
    # The global admin sees every grant.
    assert await grants_seen(None) == [("default", READER), ("other", OPERATOR), ("third", READER)]


async def test_replicas_starting_together_make_one_first_admin_key(database_url: str, tmp_path: Path) -> None:
    """Several first starts at once on one database (replicas, each with its own data
    directory): exactly one makes a key, and its file holds it."""
    engines = [make_engine(database_url) for _ in range(4)]
    try:
        await upgrade(engines[0])
        for engine in engines:  # connected beforehand, so the starts overlap
            async with engine.connect() as conn:
                await conn.execute(select(1))
        kept: dict[int, str] = {}

        def keeper(i: int) -> Callable[[str], None]:
            return lambda secret: kept.__setitem__(i, secret)

        made = await asyncio.gather(
            *(
                ApiKeyRegistry(SqlStore(e, b"k" * 32), utcnow).bootstrap(keeper(i))
                for i, e in enumerate(engines)
            )
        )
        winners = [i for i, new in enumerate(made) if new is not None]
        assert len(winners) == 1, made
        winner = made[winners[0]]
        assert winner is not None and kept == {winners[0]: winner.secret}
        async with engines[0].connect() as conn:
            assert (await conn.execute(select(api_keys.c.id))).scalars().all() == [winner.key.id]
    finally:
        for engine in engines:
            await engine.dispose()


async def test_a_key_file_that_cannot_be_written_leaves_no_key(database_url: str, tmp_path: Path) -> None:
    """The first admin key is kept before it is committed: if its file cannot be
    written the start fails saying so and makes no key, and the next start makes it."""
    settings = fast_settings(tmp_path, database_url)
    settings.data_dir.mkdir(parents=True)
    (settings.data_dir / ADMIN_KEY_FILE).mkdir()  # a directory where the file goes
    app = App(settings)
    with pytest.raises(FailedPrecondition, match="cannot keep the first admin key"):
        await app.start()
    engine = make_engine(settings.url)
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(select(api_keys.c.id))).all() == []
    finally:
        await engine.dispose()
    (settings.data_dir / ADMIN_KEY_FILE).rmdir()
    again = App(settings)
    await again.start()
    try:
        secret = (settings.data_dir / ADMIN_KEY_FILE).read_text().strip()
        principal = await again.api_keys.authenticate(secret)
        assert principal.grants == {"*": Role.ADMIN}
    finally:
        await again.stop()
