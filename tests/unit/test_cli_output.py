"""How operator commands print: tables with headers from the records' views, enum names
without their prefix, times in UTC, maps as k=v; paging stops at the limit and says so."""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from controlplane.api.bundle.v1 import bundle_pb2
from controlplane.api.node.v1 import node_pb2
from controlplane.cli import output


def test_a_list_is_a_table_with_headers() -> None:
    reply = node_pb2.ListNodesResponse(
        nodes=[
            node_pb2.Node(
                id="n-1",
                name="edge-1",
                status=node_pb2.NODE_STATUS_ONLINE,
                labels={"region": "eu", "env": "prod"},
                desired_digest="sha256:" + "a" * 64,
                last_heartbeat_at=Timestamp(seconds=1_800_000_000),
            )
        ]
    )
    header, row = output.table(reply).splitlines()
    assert header.split() == [
        "ID",
        "NAME",
        "STATUS",
        "HEALTH",
        "LABELS",
        "DESIRED",
        "APPLIED",
        "LAST",
        "HEARTBEAT",
    ]
    assert row.split() == [
        "n-1",
        "edge-1",
        "online",
        "env=prod,region=eu",
        "sha256:aaaaaaaaaaaa",
        "2027-01-15T08:00:00Z",
    ]


def test_an_answer_without_a_view_shows_its_own_fields() -> None:
    text = output.table(bundle_pb2.AssignBundleResponse(revision=42, keys=["sel:default:env=dev"]))
    assert text.splitlines() == ["REVISION   KEYS", "42         sel:default:env=dev"]


def test_a_record_with_an_extra_field_shows_both() -> None:
    reply = bundle_pb2.UploadBundleResponse(
        bundle=bundle_pb2.Bundle(digest="sha256:ab", version="v1", state=bundle_pb2.BUNDLE_STATE_VALID),
        created=True,
    )
    lines = output.table(reply).splitlines()
    assert lines[0].split()[:3] == ["DIGEST", "VERSION", "STATE"] and lines[1].split()[:3] == [
        "sha256:ab",
        "v1",
        "valid",
    ]
    assert lines[-1] == "created: yes"


@pytest.mark.parametrize(
    ("limit", "all_pages", "shown", "note"), [(3, False, 3, True), (7, False, 7, False), (1, True, 7, False)]
)
def test_pages_are_fetched_up_to_the_limit(
    limit: int, all_pages: bool, shown: int, note: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    names = [f"n-{i}" for i in range(7)]
    asked: list[tuple[str, int]] = []

    def fetch(token: str, size: int) -> node_pb2.ListNodesResponse:
        asked.append((token, size))
        start = int(token or 0)
        page = names[start : start + min(size, 2)]  # the server's pages are smaller than asked
        more = start + len(page) < len(names)
        return node_pb2.ListNodesResponse(
            nodes=[node_pb2.Node(id=n) for n in page], next_page_token=str(start + len(page)) if more else ""
        )

    merged = output.fetch_pages(fetch, "nodes", limit, all_pages, "nodes")
    assert [n.id for n in merged.nodes] == names[:shown]
    err = capsys.readouterr().err
    assert ("more nodes than the" in err) is note, err
    assert all(size >= 1 for _, size in asked)


def test_an_answer_with_nothing_for_a_cell_reads_as_yaml() -> None:
    """A configuration (no list, no plain field) is not an empty table."""
    config = bundle_pb2.ValidationConfig(
        main="nginx.conf", proxies=[bundle_pb2.ProxyCheck(kind=bundle_pb2.PROXY_KIND_NGINX)]
    )
    text = output.table(bundle_pb2.SetValidationConfigResponse(config=config))
    assert "main: nginx.conf" in text and "PROXY_KIND_NGINX" in text, text
