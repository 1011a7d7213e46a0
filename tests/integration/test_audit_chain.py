"""The audit chain: every mutation leaves an entry; editing, deleting, inserting,
reordering or cutting entries directly in the database is detected and named."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Awaitable, Callable

import grpc
import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from controlplane.api.audit.v1 import audit_pb2 as apb
from controlplane.api.node.v1 import node_pb2 as npb
from controlplane.domain.audit import chain, trail
from controlplane.domain.kernel.errors import Aborted
from controlplane.domain.model import audit as audit_model
from controlplane.rpc.errors import status_of
from controlplane.store.schema import audit_head, audit_log, nodes
from tests.integration.test_auth_cli import run
from tests.support.archives import bundle
from tests.support.harness import Harness, Registered


async def make_history(h: Harness) -> None:
    digest = await h.upload(bundle({"a": b"1"}), version="v1")
    node = await h.register("n1", {"env": "prod"})
    await h.assign(digest, selector="env=prod")
    await h.nodes.UpdateNodeLabels(npb.UpdateNodeLabelsRequest(node_id=node.node_id, labels={"env": "dev"}))
    await h.register("n2", {})


async def entries(h: Harness) -> list[audit_model.AuditEntry]:
    async with h.app.store.read() as tx:
        return [e async for e in tx.audit.entries()]


async def verify(h: Harness) -> chain.ChainReport:
    return await trail.verify(h.app.store, h.app.store._audit_key)


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


def assert_chain_order(chain: list[audit_model.AuditEntry]) -> None:
    """Numbered 1, 2, … with no gap, and timed in that order (an entry's time is when it
    was chained: docs/security.md, Audit)."""
    assert [e.seq for e in chain] == list(range(1, len(chain) + 1))
    back = [(a.seq, a.at, b.seq, b.at) for a, b in itertools.pairwise(chain) if b.at < a.at]
    assert not back, f"time goes back along the chain: {back[:3]}"


async def test_concurrent_writers_keep_a_valid_chain(harness: Harness) -> None:
    """Thirty registrations at once: each is one entry, by the node itself, naming it
    and its labels — none lost, doubled or mixed with another's — in a chain that
    verifies and whose times follow its order."""
    started = len(await entries(harness))
    registered = await asyncio.gather(*(harness.register(f"n{i}", {"i": str(i)}) for i in range(30)))
    report = await verify(harness)
    assert report.ok, report.reason
    chain = await entries(harness)
    assert report.entries == len(chain) and report.head_mac == chain[-1].mac
    assert_chain_order(chain)
    new = chain[started:]
    assert [e.action for e in new] == ["node.register"] * 30
    by_node = {e.resource: e for e in new}
    assert sorted(by_node) == sorted(f"node/{r.node_id}" for r in registered)
    for i, r in enumerate(registered):
        e = by_node[f"node/{r.node_id}"]
        assert e.actor == f"node:{r.node_id}" and e.project == "default"
        assert e.after is not None and (e.after["name"], e.after["labels"]) == (f"n{i}", {"i": str(i)})
    assert len({e.request_id for e in new}) == 30


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


async def _truncate_and_rewrite_head(conn: AsyncConnection) -> None:
    """Cut the tail and make the head match the new last entry, as anyone with the
    database but not the key can."""
    await _truncate(conn)
    last = (await conn.execute(select(audit_log).where(audit_log.c.seq == 4))).one()
    await conn.execute(update(audit_head).values(seq=last.seq, mac=last.mac))


async def _truncate_and_unseal_head(conn: AsyncConnection) -> None:
    await _truncate_and_rewrite_head(conn)
    await conn.execute(update(audit_head).values(seal=""))


@pytest.mark.parametrize(
    ("tamper", "first_bad"),
    [
        (_edit, 3),
        (_edit_json, 4),
        (_delete, 4),
        (_insert, 4),
        (_swap, 3),
        (_truncate, 0),
        (_truncate_and_rewrite_head, 0),
        (_truncate_and_unseal_head, 0),
    ],
    ids=[
        "edit",
        "edit-json",
        "delete",
        "insert",
        "swap",
        "truncate",
        "truncate-rewrite-head",
        "truncate-unseal",
    ],
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


async def test_registrations_and_relabels_together_never_deadlock(harness: Harness) -> None:
    """A registration audits and writes labels; a relabel does the same in the other
    order of tables. Both take the audit head last, so on PostgreSQL neither waits for
    the other in a cycle: every call succeeds and the chain verifies."""
    existing = [await harness.register(f"old{i}", {"round": "0"}) for i in range(40)]
    started = len(await entries(harness))

    async def relabel(i: int) -> None:
        await harness.nodes.UpdateNodeLabels(
            npb.UpdateNodeLabelsRequest(node_id=existing[i].node_id, labels={"round": "1"})
        )

    outcomes = await asyncio.gather(
        *(harness.register(f"new{i}", {"i": str(i)}) for i in range(40)),
        *(relabel(i) for i in range(40)),
        return_exceptions=True,
    )
    failed = [repr(o) for o in outcomes if isinstance(o, BaseException)]
    assert not failed, failed
    report = await verify(harness)
    assert report.ok, report.reason
    chain = await entries(harness)
    assert_chain_order(chain)
    new = chain[started:]
    registered = sorted(
        (e.actor, e.after["name"], e.after["labels"]["i"])
        for e in new
        if e.action == "node.register" and e.after is not None
    )
    assert registered == sorted(
        (f"node:{o.node_id}", f"new{i}", str(i))
        for i, o in enumerate(outcomes[:40])
        if isinstance(o, Registered)
    )
    relabels = sorted(
        (e.resource, e.before, (e.after or {}).get("labels")) for e in new if e.action == "node.relabel"
    )
    assert relabels == sorted(
        (f"node/{n.node_id}", {"labels": {"round": "0"}}, {"round": "1"}) for n in existing
    )
    assert len(new) == 80


async def test_verify_is_consistent_while_writers_run(harness: Harness) -> None:
    """Each verification reads one snapshot: entries committed after its head are not
    counted, so concurrent writers never raise a false alarm."""
    nodes = [await harness.register(f"n{i}") for i in range(10)]
    done = asyncio.Event()

    async def writer(i: int) -> None:
        round_ = 0
        while not done.is_set():
            round_ += 1
            await harness.nodes.UpdateNodeLabels(
                npb.UpdateNodeLabelsRequest(node_id=nodes[i].node_id, labels={"round": str(round_)})
            )

    writers = [asyncio.create_task(writer(i)) for i in range(len(nodes))]
    try:
        heads: list[tuple[int, str]] = []
        # At least 30 verifications, and on until the writers have moved the head between
        # two of them (a loaded machine may run many verifications before a write lands).
        while len(heads) < 30 or (heads[-1][0] == heads[0][0] and len(heads) < 3000):
            reply = await harness.audit.VerifyAuditChain(apb.VerifyAuditChainRequest())
            assert reply.ok, reply.reason
            heads.append((reply.head_seq, reply.head_mac))
    finally:
        done.set()
        await asyncio.gather(*writers)
    # Each verification saw a head that was really committed — the entry of that number
    # in the final log has that MAC — and later ones never saw an earlier head.
    chain = {e.seq: e.mac for e in await entries(harness)}
    assert [(seq, chain.get(seq)) for seq, _ in heads] == heads
    assert [seq for seq, _ in heads] == sorted(seq for seq, _ in heads)
    assert heads[-1][0] > heads[0][0]  # the writers did run during the verifications


async def test_a_rewritten_head_stays_detected_after_more_writes(harness: Harness) -> None:
    """New entries chained onto a head rewritten without the key do not make the cut
    look whole: the head keeps its stale seal."""
    await make_history(harness)
    async with harness.app.engine.begin() as conn:
        await _truncate_and_rewrite_head(conn)
    await harness.register("after-the-cut")
    report = await verify(harness)
    assert not report.ok and "seal does not match" in report.reason, report.reason


async def test_a_removed_seal_is_named_once_the_head_is_sealed_again(harness: Harness) -> None:
    """A head found unsealed is sealed by the next write behind an `audit.seal` entry;
    a store has one such entry (its first), so another names the entry."""
    await make_history(harness)
    first = await entries(harness)
    assert [e.seq for e in first if e.action == chain.SEAL_ACTION] == [1]
    async with harness.app.engine.begin() as conn:
        await _truncate_and_unseal_head(conn)
    await harness.register("after-the-cut")
    report = await verify(harness)
    assert not report.ok and report.first_bad_seq == 5, report.reason
    assert "unsealed again" in report.reason


async def test_a_restored_older_store_is_caught_by_an_external_checkpoint(harness: Harness) -> None:
    """An older copy of the whole store (older log, its older sealed head) verifies on
    its own; a checkpoint recorded outside since then does not."""
    await make_history(harness)
    older = await verify(harness)
    await harness.register("later")
    checkpoint = await harness.audit.VerifyAuditChain(apb.VerifyAuditChainRequest())
    assert checkpoint.ok and checkpoint.head_seq > older.head_seq and len(checkpoint.head_mac) == 64
    # Restore: the log and the head as they were at `older` (the head sealed back then).
    async with harness.app.engine.begin() as conn:
        await conn.execute(delete(audit_log).where(audit_log.c.seq > older.head_seq))
        await conn.execute(
            update(audit_head).values(
                seq=older.head_seq,
                mac=older.head_mac,
                seal=chain.head_seal(harness.app.store._audit_key, older.head_seq, older.head_mac),
            )
        )
    assert (await harness.audit.VerifyAuditChain(apb.VerifyAuditChainRequest())).ok
    held = apb.VerifyAuditChainRequest(checkpoint_seq=checkpoint.head_seq, checkpoint_mac=checkpoint.head_mac)
    reply = await harness.audit.VerifyAuditChain(held)
    assert not reply.ok and "before the checkpoint" in reply.reason
    # A checkpoint the older copy does hold still verifies; a wrong MAC for it does not.
    kept = apb.VerifyAuditChainRequest(checkpoint_seq=older.head_seq, checkpoint_mac=older.head_mac)
    assert (await harness.audit.VerifyAuditChain(kept)).ok
    forged = apb.VerifyAuditChainRequest(checkpoint_seq=older.head_seq, checkpoint_mac="0" * 64)
    reply = await harness.audit.VerifyAuditChain(forged)
    assert not reply.ok and reply.first_bad_seq == older.head_seq and "checkpoint" in reply.reason


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (apb.VerifyAuditChainRequest(checkpoint_seq=-1), "checkpoint_seq"),
        (apb.VerifyAuditChainRequest(checkpoint_seq=3, checkpoint_mac="abc"), "checkpoint_mac"),
        (apb.VerifyAuditChainRequest(checkpoint_mac="0" * 64), "checkpoint_mac"),
    ],
)
async def test_bad_checkpoints_name_the_field(
    harness: Harness, request_: apb.VerifyAuditChainRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await harness.audit.VerifyAuditChain(request_)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (e.value.details() or "").startswith(field)


async def test_the_cli_prints_a_checkpoint_and_checks_it(harness: Harness) -> None:
    admin = ["--api-key", harness.admin_key, "audit", "verify", "-o", "json", "--server", harness.address]
    first = await run(*admin)
    assert first.exit_code == 0, first.output
    body = json.loads(first.stdout)
    printed = f"checkpoint: {body['head_seq']}:{body['head_mac']}"
    assert printed in first.stderr
    again = await run(*admin, "--checkpoint", printed.split(" ", 1)[1])
    assert again.exit_code == 0, again.output
    wrong = await run(*admin, "--checkpoint", f"{body['head_seq']}:{'0' * 64}")
    assert wrong.exit_code == 1 and "checkpoint" in wrong.output
    bad = await run(*admin, "--checkpoint", "nonsense")
    assert bad.exit_code == 2 and "SEQ:MAC" in bad.output


async def test_a_deadlock_the_database_still_reports_is_retryable(pg_harness: Harness) -> None:
    """Two transactions locking two rows in opposite orders: PostgreSQL rolls one back,
    and it answers ABORTED ("retry"), not INTERNAL."""
    a, b = await pg_harness.register("a"), await pg_harness.register("b")
    store = pg_harness.app.store
    both_hold_one = asyncio.Barrier(2)

    async def lock(first: str, second: str) -> None:
        async with store.write() as tx:
            for i, node_id in enumerate((first, second)):
                await tx.conn.execute(select(nodes).where(nodes.c.id == node_id).with_for_update())
                if i == 0:
                    await both_hold_one.wait()

    outcomes = await asyncio.gather(
        lock(a.node_id, b.node_id), lock(b.node_id, a.node_id), return_exceptions=True
    )
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(failed) == 1, outcomes
    assert isinstance(failed[0], Aborted) and str(failed[0]) == "concurrent update, retry"
    assert status_of(failed[0]) == grpc.StatusCode.ABORTED
