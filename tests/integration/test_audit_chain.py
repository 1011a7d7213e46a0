"""The audit chain: every mutation leaves an entry; editing, deleting, inserting,
reordering or cutting entries directly in the database is detected and named."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from controlplane.api.audit.v1 import audit_pb2 as apb
from controlplane.api.node.v1 import node_pb2 as npb
from controlplane.domain import audit
from controlplane.store.schema import audit_log
from tests.support.archives import bundle
from tests.support.harness import Harness


async def make_history(h: Harness) -> None:
    digest = await h.upload(bundle({"a": b"1"}), version="v1")
    node = await h.register("n1", {"env": "prod"})
    await h.assign(digest, selector="env=prod")
    await h.nodes.UpdateNodeLabels(npb.UpdateNodeLabelsRequest(node_id=node.node_id, labels={"env": "dev"}))
    await h.register("n2", {})


async def entries(h: Harness) -> list[audit.AuditEntry]:
    async with h.app.store.read() as tx:
        return [e async for e in tx.audit.entries()]


async def verify(h: Harness) -> audit.ChainReport:
    return await audit.verify(h.app.store, h.app.store._audit_key)


async def test_mutations_are_recorded_with_actor_and_request(harness: Harness) -> None:
    started = len(await entries(harness))
    await make_history(harness)
    everything = await entries(harness)
    # First start: the system made the default project and the first admin key (and
    # whatever else other areas set up then).
    first = everything[:started]
    assert {e.actor for e in first} == {"system:first-start"} or all(
        e.actor.startswith("system:") for e in first
    )
    assert {"project.create", "apikey.create"} <= {e.action for e in first}
    got = everything[started:]
    assert [e.action for e in got] == [
        "bundle.create",
        "node.register",
        "desired.assign",
        "node.relabel",
        "node.register",
    ]
    admin = f"operator:{harness.admin_key.split('_')[1]}"
    assert got[0].actor == admin  # the harness calls as the first-start admin key
    assert got[1].actor == f"node:{got[1].resource.split('/')[1]}"  # a node registers itself
    assign = got[2]
    assert assign.actor == admin
    assert assign.after is not None and assign.after["keys"] == ["sel:default:env=prod"]
    assert all(e.request_id for e in got)
    assert len({e.request_id for e in got}) == 5
    relabel = got[3]
    assert relabel.before == {"labels": {"env": "prod"}}
    report = await verify(harness)
    assert report.ok and report.entries == len(everything)


async def test_concurrent_writers_keep_a_valid_chain(harness: Harness) -> None:
    started = len(await entries(harness))
    await asyncio.gather(*(harness.register(f"n{i}", {"i": str(i)}) for i in range(30)))
    report = await verify(harness)
    assert report.ok, report.reason
    assert report.entries == started + 30


Tamper = Callable[[AsyncConnection], Awaitable[None]]


async def _edit(conn: AsyncConnection) -> None:
    await conn.execute(update(audit_log).where(audit_log.c.seq == 3).values(actor="operator:someone-else"))


async def _edit_json(conn: AsyncConnection) -> None:
    await conn.execute(update(audit_log).where(audit_log.c.seq == 4).values(after={"digest": "forged"}))


async def _delete(conn: AsyncConnection) -> None:
    await conn.execute(delete(audit_log).where(audit_log.c.seq == 3))


async def _insert(conn: AsyncConnection) -> None:
    # A forged entry slipped in as number 4: everything after is renumbered to make room.
    rows = (
        await conn.execute(select(audit_log).where(audit_log.c.seq >= 4).order_by(audit_log.c.seq.desc()))
    ).all()
    for row in rows:
        await conn.execute(update(audit_log).where(audit_log.c.seq == row.seq).values(seq=row.seq + 1))
    forged = dict(rows[-1]._mapping) | {"seq": 4, "action": "node.register", "resource": "node/n-forged"}
    await conn.execute(audit_log.insert().values(**forged))


async def _swap(conn: AsyncConnection) -> None:
    a, b = (
        await conn.execute(select(audit_log).where(audit_log.c.seq.in_([3, 4])).order_by(audit_log.c.seq))
    ).all()
    for row, seq in ((a, 4), (b, 3)):
        values = dict(row._mapping)
        values.pop("seq")
        await conn.execute(update(audit_log).where(audit_log.c.seq == seq).values(**values))


async def _truncate(conn: AsyncConnection) -> None:
    await conn.execute(delete(audit_log).where(audit_log.c.seq >= 5))


@pytest.mark.parametrize(
    ("tamper", "first_bad"),
    [(_edit, 3), (_edit_json, 4), (_delete, 4), (_insert, 4), (_swap, 3), (_truncate, 0)],
    ids=["edit", "edit-json", "delete", "insert", "swap", "truncate"],
)
async def test_tampering_is_detected_and_named(harness: Harness, tamper: Tamper, first_bad: int) -> None:
    await make_history(harness)
    assert (await verify(harness)).ok
    async with harness.app.engine.begin() as conn:
        await tamper(conn)
    report = await verify(harness)
    assert not report.ok
    assert report.first_bad_seq == first_bad, report.reason
    assert (f"entry {first_bad}" if first_bad else "chain head") in report.reason
    # The same verdict over the API.
    reply = await harness.audit.VerifyAuditChain(apb.VerifyAuditChainRequest())
    assert not reply.ok
    assert reply.first_bad_seq == first_bad and reply.reason == report.reason
