"""AuditService over gRPC: filtered, paged listing; the JSON-lines export, re-verified
outside the server with the key; a chain that stays valid under many concurrent
operators and nodes; on both databases."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from controlplane.api.audit.v1 import audit_pb2 as apb
from controlplane.api.identity.v1 import identity_pb2 as ipb
from controlplane.api.node.v1 import node_pb2 as npb
from controlplane.api.project.v1 import project_pb2 as ppb
from controlplane.domain.audit.chain import GENESIS
from tests.support.harness import Harness, auth


def ts(value: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(value)
    return out


async def export(h: Harness, **fields: object) -> list[dict[str, object]]:
    lines: list[dict[str, object]] = []
    async for reply in h.audit.ExportAuditEvents(apb.ExportAuditEventsRequest(**fields)):  # type: ignore[arg-type]
        lines += [json.loads(line) for line in reply.jsonl.decode().splitlines()]
    return lines


async def test_list_filters_and_pages(harness: Harness) -> None:
    start = datetime.now(UTC) - timedelta(seconds=1)
    nodes = [await harness.register(f"n{i}", {"i": str(i)}) for i in range(5)]
    await harness.nodes.UpdateNodeLabels(
        npb.UpdateNodeLabelsRequest(node_id=nodes[0].node_id, labels={"x": "y"})
    )
    registered = apb.AuditFilter(action="node.register", start_time=ts(start))
    seen: list[int] = []
    token = ""
    while True:
        page = await harness.audit.ListAuditEvents(
            apb.ListAuditEventsRequest(project="default", filter=registered, page_size=2, page_token=token)
        )
        assert len(page.events) <= 2
        seen += [e.seq for e in page.events]
        assert all(e.action == "node.register" and e.project == "default" for e in page.events)
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 5 and seen == sorted(seen)
    newest = await harness.audit.ListAuditEvents(apb.ListAuditEventsRequest(newest_first=True, page_size=1))
    assert newest.events[0].action == "node.relabel"
    assert newest.events[0].actor == f"operator:{harness.admin_key.split('_')[1]}"
    assert dict(newest.events[0].before)["labels"] == {"i": "0"}
    by_actor = await harness.audit.ListAuditEvents(
        apb.ListAuditEventsRequest(filter=apb.AuditFilter(actor=f"node:{nodes[3].node_id}"))
    )
    assert [e.resource for e in by_actor.events] == [f"node/{nodes[3].node_id}"]
    future = await harness.audit.ListAuditEvents(
        apb.ListAuditEventsRequest(
            filter=apb.AuditFilter(start_time=ts(datetime.now(UTC) + timedelta(hours=1)))
        )
    )
    assert not future.events


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (apb.ListAuditEventsRequest(page_size=-1), "page_size"),
        (apb.ListAuditEventsRequest(page_token="%%%"), "page_token"),
        (apb.ListAuditEventsRequest(page_token="MA=="), "page_token"),
        (
            apb.ListAuditEventsRequest(
                filter=apb.AuditFilter(
                    start_time=ts(datetime(2030, 1, 2, tzinfo=UTC)),
                    end_time=ts(datetime(2030, 1, 1, tzinfo=UTC)),
                )
            ),
            "filter.end_time",
        ),
    ],
)
async def test_bad_list_requests_name_the_field(
    harness: Harness, request_: apb.ListAuditEventsRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await harness.audit.ListAuditEvents(request_)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (e.value.details() or "").startswith(field)


async def test_export_is_verifiable_outside_the_server(harness: Harness) -> None:
    for i in range(3):
        await harness.register(f"n{i}")
    lines = await export(harness)
    key = harness.app.store._audit_key
    previous = GENESIS
    for entry in lines:
        body = {
            k: entry[k]
            for k in ("seq", "at", "actor", "action", "resource", "project", "before", "after", "request_id")
        }
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        mac = hmac.new(key, canonical + previous.encode(), hashlib.sha256).hexdigest()
        assert mac == entry["mac"], entry
        previous = str(entry["mac"])
    chain = await harness.audit.VerifyAuditChain(apb.VerifyAuditChainRequest())
    assert chain.ok and chain.entries == len(lines) == chain.head_seq
    only_nodes = await export(harness, filter=apb.AuditFilter(action="node.register"))
    assert len(only_nodes) == 3


async def test_a_project_key_reads_only_its_projects_audit(harness: Harness) -> None:
    await harness.projects.CreateProject(ppb.CreateProjectRequest(name="other"))
    reader = auth(await harness.api_key({"default": ipb.ROLE_READER}))
    mine = await harness.audit.ListAuditEvents(apb.ListAuditEventsRequest(project="default"), metadata=reader)
    assert mine.events and all(e.project == "default" for e in mine.events)
    for request in (apb.ListAuditEventsRequest(project="other"), apb.ListAuditEventsRequest()):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await harness.audit.ListAuditEvents(request, metadata=reader)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await harness.audit.VerifyAuditChain(apb.VerifyAuditChainRequest(), metadata=reader)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_many_concurrent_clients_leave_a_valid_chain(harness: Harness) -> None:
    """Eight operators and eight nodes at once: every call leaves exactly its entry, by
    its caller, in the caller's order, and the export is the verified chain."""
    secrets = [await harness.api_key({"default": ipb.ROLE_ADMIN}, name=f"op{i}") for i in range(8)]
    keys = [auth(secret) for secret in secrets]
    nodes = [await harness.register(f"n{i}") for i in range(8)]

    async def operator(i: int) -> None:
        for j in range(5):
            await harness.nodes.UpdateNodeLabels(
                npb.UpdateNodeLabelsRequest(node_id=nodes[i].node_id, labels={"round": str(j)}),
                metadata=keys[i],
            )
            await harness.identity.CreateEnrollmentToken(
                ipb.CreateEnrollmentTokenRequest(project="default"), metadata=keys[i]
            )

    async def node(i: int) -> None:
        again = await harness.register(f"n{i}", {"again": "yes"})  # rotates its credential
        await harness.nodes.Heartbeat(npb.HeartbeatRequest(node_id=again.node_id), metadata=again.metadata)

    before = (await harness.audit.VerifyAuditChain(apb.VerifyAuditChainRequest())).entries
    await asyncio.gather(*(operator(i) for i in range(8)), *(node(i) for i in range(8)))
    chain = await harness.audit.VerifyAuditChain(apb.VerifyAuditChainRequest())
    assert chain.ok, chain.reason
    lines = await export(harness)
    assert [e["seq"] for e in lines] == list(range(1, chain.entries + 1))
    assert lines[-1]["mac"] == chain.head_mac
    new = lines[before:]
    for i, secret in enumerate(secrets):
        mine = [e for e in new if e["actor"] == f"operator:{secret.split('_')[1]}"]
        relabels = [e for e in mine if e["action"] == "node.relabel"]
        assert [(e["resource"], e["after"]["labels"]) for e in relabels] == [  # type: ignore[index]
            (f"node/{nodes[i].node_id}", {"round": str(j)}) for j in range(5)
        ]
        tokens = [e for e in mine if e["action"] == "enrollment_token.create"]
        assert len(tokens) == 5 and len({e["resource"] for e in tokens}) == 5
        assert len(mine) == 10
    for i in range(8):
        theirs = [e for e in new if e["actor"] == f"node:{nodes[i].node_id}"]
        assert [e["action"] for e in theirs if e["action"] != "node.online"] == ["node.reregister"]
        # A node that just registered is offline until it beats: at most one node.online.
        assert len(theirs) <= 2
    assert len(new) == len([e for e in new if str(e["actor"]).startswith(("operator:", "node:"))])
