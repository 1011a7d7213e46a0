"""`controlplane nodes ...`"""

from __future__ import annotations

from typing import Any

import click

from controlplane.api.node.v1 import node_pb2, node_pb2_grpc
from controlplane.cli.client import call, call_pages, channel, labels, project_option, server_option
from controlplane.cli.output import OutputGroup, paged


@click.group(cls=OutputGroup)
def nodes() -> None:
    """Nodes."""


@nodes.command("list")
@server_option
@project_option
@click.option("--selector", default="", help="env=prod,region=eu")
@paged
def node_list(server: str, project: str, selector: str, limit: int, all_pages: bool) -> None:
    """The project's nodes: desired and applied bundles, health, last heartbeat."""
    stub = node_pb2_grpc.NodeServiceStub(channel(server))

    def page(token: str, size: int) -> Any:
        request = node_pb2.ListNodesRequest(
            project=project, selector=selector, page_size=size, page_token=token
        )
        return stub.ListNodes(request)

    call_pages(page, "nodes", limit, all_pages, "nodes")


@nodes.command("get")
@server_option
@click.argument("node_id")
def node_get(server: str, node_id: str) -> None:
    stub = node_pb2_grpc.NodeServiceStub(channel(server))
    call(lambda: stub.GetNode(node_pb2.GetNodeRequest(node_id=node_id)))


@nodes.command("label")
@server_option
@click.argument("node_id")
@click.argument("pairs", nargs=-1)
def node_label(server: str, node_id: str, pairs: tuple[str, ...]) -> None:
    """Replace a node's labels: `nodes label n-123 env=prod region=eu`."""
    stub = node_pb2_grpc.NodeServiceStub(channel(server))
    request = node_pb2.UpdateNodeLabelsRequest(node_id=node_id, labels=labels(pairs))
    call(lambda: stub.UpdateNodeLabels(request))
