"""docs/operations.md lists every series a running server exports (and no other), each
saying how it aggregates across processes; the Grafana dashboard queries only series and
labels that exist."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from controlplane.api.node.v1 import node_pb2
from tests.conftest import HarnessFactory

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "operations.md"
DASHBOARD = ROOT / "deploy" / "grafana" / "controlplane.json"
# prometheus-client's own process and runtime series: documented as a group.
STANDARD = ("python_", "process_")
# Labels Prometheus adds when it scrapes, and a histogram's bucket bound.
SCRAPE_LABELS = {"instance", "job", "le"}


def documented() -> dict[str, tuple[str, set[str], str]]:
    """series -> (type, labels, across processes), from the doc's table."""
    text = DOC.read_text()
    table = text[text.index("<!-- metrics:start -->") : text.index("<!-- metrics:end -->")]
    rows: dict[str, tuple[str, set[str], str]] = {}
    for line in table.splitlines()[3:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 5:
            continue
        name = cells[0].strip("`")
        # Label names, not the values some rows list in parentheses after them.
        labels = set(re.findall(r"`([a-z_]+)`", re.sub(r"\([^)]*\)", "", cells[2])))
        rows[name] = (cells[1], labels, cells[3])
    return rows


def exported(port: int) -> dict[str, tuple[str, set[str]]]:
    """series name (counters with _total) -> (type, label names) from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found: dict[str, tuple[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith(STANDARD):
            continue
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = {k for s in family.samples for k in s.labels} - {"le"}
        found[name] = (family.type, labels)
    return found


async def test_every_exported_series_is_documented_and_the_dashboard_uses_only_those(
    make_harness: HarnessFactory,
) -> None:
    h = await make_harness(metrics_listen="127.0.0.1:0")
    # One call of each kind, so labelled series have samples whose labels can be read.
    await h.nodes.ListNodes(node_pb2.ListNodesRequest(project="default"))
    series = exported(h.app._metrics_server.server_port)
    doc = documented()
    assert sorted(set(series) - set(doc)) == [], "exported but not in docs/operations.md"
    assert sorted(set(doc) - set(series)) == [], "in docs/operations.md but not exported"
    for name, (kind, labels, across) in doc.items():
        assert kind == series[name][0], f"{name} is a {series[name][0]}, the doc says {kind}"
        assert across in ("sum", "once", "max"), f"{name}: say how it aggregates across processes"
        assert series[name][1] <= labels, f"{name} has labels {series[name][1]}, the doc lists {labels}"

    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert exprs
    for expr in exprs:
        used = re.findall(r"\b((?:controlplane|grpc_server)_[a-z_]+)", expr)
        assert used, expr
        known_labels = set(SCRAPE_LABELS)
        for name in used:
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            assert name in doc or (base in doc and doc[base][0] == "histogram"), f"{name} in {expr!r}"
            known_labels |= doc[name if name in doc else base][1]
        for label in re.findall(r"[{,]\s*([a-z_]+)\s*=~?", expr) + [
            part.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for part in group.split(",")
        ]:
            assert label in known_labels, f"label {label!r} in {expr!r}"
