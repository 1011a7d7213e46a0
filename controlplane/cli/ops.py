"""Operator commands: thin gRPC clients printing JSON (pipe to jq)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from controlplane.api.bundle.v1 import bundle_pb2, bundle_pb2_grpc
from controlplane.api.node.v1 import node_pb2, node_pb2_grpc
from controlplane.api.project.v1 import project_pb2, project_pb2_grpc
from controlplane.domain.errors import InvalidArgument
from controlplane.domain.labels import parse_label_pairs

F = TypeVar("F", bound=Callable[..., Any])
UPLOAD_CHUNK = 1024 * 1024

server_option = click.option(
    "--server", default="127.0.0.1:50051", show_default=True, envvar="CONTROLPLANE_SERVER", show_envvar=True
)
project_option = click.option(
    "--project", default="default", show_default=True, envvar="CONTROLPLANE_PROJECT", show_envvar=True
)


def _channel(server: str) -> grpc.Channel:
    return grpc.insecure_channel(server)


def _print(message: Message) -> None:
    click.echo(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2))


def _call(fn: Callable[[], Message]) -> None:
    try:
        _print(fn())
    except grpc.RpcError as e:
        raise click.ClickException(f"{e.code().name}: {e.details()}") from None


def _labels(pairs: tuple[str, ...]) -> dict[str, str]:
    try:
        return parse_label_pairs(pairs)
    except InvalidArgument as e:
        raise click.BadParameter(str(e)) from None


@click.group()
def projects() -> None:
    """Projects."""


@projects.command("create")
@server_option
@click.argument("name")
def project_create(server: str, name: str) -> None:
    """Create a project; prints its enrollment token once."""
    stub = project_pb2_grpc.ProjectServiceStub(_channel(server))
    _call(lambda: stub.CreateProject(project_pb2.CreateProjectRequest(name=name)))


@projects.command("list")
@server_option
def project_list(server: str) -> None:
    stub = project_pb2_grpc.ProjectServiceStub(_channel(server))
    _call(lambda: stub.ListProjects(project_pb2.ListProjectsRequest()))


@click.group()
def nodes() -> None:
    """Nodes."""


@nodes.command("list")
@server_option
@project_option
@click.option("--selector", default="", help="env=prod,region=eu")
def node_list(server: str, project: str, selector: str) -> None:
    stub = node_pb2_grpc.NodeServiceStub(_channel(server))
    _call(
        lambda: stub.ListNodes(node_pb2.ListNodesRequest(project=project, selector=selector, page_size=1000))
    )


@nodes.command("get")
@server_option
@click.argument("node_id")
def node_get(server: str, node_id: str) -> None:
    stub = node_pb2_grpc.NodeServiceStub(_channel(server))
    _call(lambda: stub.GetNode(node_pb2.GetNodeRequest(node_id=node_id)))


@nodes.command("label")
@server_option
@click.argument("node_id")
@click.argument("labels", nargs=-1)
def node_label(server: str, node_id: str, labels: tuple[str, ...]) -> None:
    """Replace a node's labels: `nodes label n-123 env=prod region=eu`."""
    stub = node_pb2_grpc.NodeServiceStub(_channel(server))
    request = node_pb2.UpdateNodeLabelsRequest(node_id=node_id, labels=_labels(labels))
    _call(lambda: stub.UpdateNodeLabels(request))


@click.group()
def bundle() -> None:
    """Bundles."""


@bundle.command("upload")
@server_option
@project_option
@click.option("--version", "version_label", default="", help="Human label such as v1.4.2.")
@click.argument("archive", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def bundle_upload(server: str, project: str, version_label: str, archive: Path) -> None:
    """Upload a ready-made .tar.zst archive."""

    def requests() -> Iterator[bundle_pb2.UploadBundleRequest]:
        header = bundle_pb2.UploadBundleHeader(project=project, version=version_label)
        with archive.open("rb") as f:
            first = True
            while chunk := f.read(UPLOAD_CHUNK):
                yield bundle_pb2.UploadBundleRequest(header=header if first else None, chunk=chunk)
                first = False

    stub = bundle_pb2_grpc.BundleServiceStub(_channel(server))
    _call(lambda: stub.UploadBundle(requests()))


@bundle.command("list")
@server_option
@project_option
def bundle_list(server: str, project: str) -> None:
    stub = bundle_pb2_grpc.BundleServiceStub(_channel(server))
    _call(lambda: stub.ListBundles(bundle_pb2.ListBundlesRequest(project=project, page_size=1000)))


def _target(selector: str | None, node_ids: tuple[str, ...]) -> bundle_pb2.Target:
    if (selector is None) == (not node_ids):
        raise click.UsageError("give exactly one of --selector or --node")
    if selector is not None:
        return bundle_pb2.Target(selector=selector)
    return bundle_pb2.Target(nodes=bundle_pb2.NodeList(node_ids=list(node_ids)))


@click.command()
@server_option
@project_option
@click.option("--selector", default=None, help="env=prod,region=eu or '*'")
@click.option("--node", "node_ids", multiple=True, help="Node id (repeatable).")
@click.option("--weight", type=click.IntRange(0, 100), default=0, help="Traffic weight 1-100.")
@click.option("--pin", is_flag=True, help="Pin the listed nodes to this bundle.")
@click.argument("digest")
def assign(
    server: str,
    project: str,
    selector: str | None,
    node_ids: tuple[str, ...],
    weight: int,
    pin: bool,
    digest: str,
) -> None:
    """Set the desired bundle of a selector's nodes or of listed nodes."""
    stub = bundle_pb2_grpc.BundleServiceStub(_channel(server))
    request = bundle_pb2.AssignBundleRequest(
        project=project, target=_target(selector, node_ids), digest=digest, traffic_weight=weight, pin=pin
    )
    _call(lambda: stub.AssignBundle(request))


@click.command()
@server_option
@project_option
@click.option("--selector", default=None)
@click.option("--node", "node_ids", multiple=True)
def unassign(server: str, project: str, selector: str | None, node_ids: tuple[str, ...]) -> None:
    """Remove an assignment."""
    stub = bundle_pb2_grpc.BundleServiceStub(_channel(server))
    request = bundle_pb2.UnassignBundleRequest(project=project, target=_target(selector, node_ids))
    _call(lambda: stub.UnassignBundle(request))


COMMANDS = (projects, nodes, bundle, assign, unassign)
