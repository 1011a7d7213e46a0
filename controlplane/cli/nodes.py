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


@nodes.group("router", cls=OutputGroup)
def router() -> None:
    """Router nodes: a node that routes a selector's traffic, with the weights rollouts set."""


@router.command("set")
@server_option
@click.argument("node_id")
@click.option("--selector", required=True, help="the nodes it routes to: app=web, or '*'")
@click.option(
    "--backend",
    required=True,
    help="the backend section of the router's own configuration whose servers the agent manages",
)
def router_set(server: str, node_id: str, selector: str, backend: str) -> None:
    """Declare NODE_ID the router of a selector (again: change its selector or backend).

    Its agent runs HAProxy (--proxy haproxy) from a bundle declaring `backend BACKEND`;
    the nodes it routes to register their addresses (agent --address HOST:PORT). Canary
    and blue-green rollouts of those nodes then move real traffic through it, and each of
    their steps waits for it to acknowledge its weights."""
    stub = node_pb2_grpc.NodeServiceStub(channel(server))
    request = node_pb2.DeclareRouterRequest(node_id=node_id, selector=selector, backend=backend)
    call(lambda: stub.DeclareRouter(request))


@router.command("remove")
@server_option
@click.argument("node_id")
def router_remove(server: str, node_id: str) -> None:
    """NODE_ID routes no more: its table is withdrawn and its agent removes the servers it added."""
    stub = node_pb2_grpc.NodeServiceStub(channel(server))
    call(lambda: stub.RemoveRouter(node_pb2.RemoveRouterRequest(node_id=node_id)))


@router.command("get")
@server_option
@click.argument("node_id")
def router_get(server: str, node_id: str) -> None:
    """A router's weights now in force (and why), and the revision it acknowledged."""
    stub = node_pb2_grpc.NodeServiceStub(channel(server))
    call(lambda: stub.GetRouter(node_pb2.GetRouterRequest(node_id=node_id)))


@router.command("list")
@server_option
@project_option
def router_list(server: str, project: str) -> None:
    """The project's routers."""
    stub = node_pb2_grpc.NodeServiceStub(channel(server))
    call(lambda: stub.ListRouters(node_pb2.ListRoutersRequest(project=project)))
