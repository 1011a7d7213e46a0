"""`controlplane bundle ...`, `assign`, `unassign`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import click

from controlplane.api.bundle.v1 import bundle_pb2, bundle_pb2_grpc
from controlplane.cli.client import call, channel, project_option, server_option

UPLOAD_CHUNK = 1024 * 1024


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

    stub = bundle_pb2_grpc.BundleServiceStub(channel(server))
    call(lambda: stub.UploadBundle(requests()))


@bundle.command("list")
@server_option
@project_option
def bundle_list(server: str, project: str) -> None:
    stub = bundle_pb2_grpc.BundleServiceStub(channel(server))
    call(lambda: stub.ListBundles(bundle_pb2.ListBundlesRequest(project=project, page_size=1000)))


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
    stub = bundle_pb2_grpc.BundleServiceStub(channel(server))
    request = bundle_pb2.AssignBundleRequest(
        project=project, target=_target(selector, node_ids), digest=digest, traffic_weight=weight, pin=pin
    )
    call(lambda: stub.AssignBundle(request))


@click.command()
@server_option
@project_option
@click.option("--selector", default=None)
@click.option("--node", "node_ids", multiple=True)
def unassign(server: str, project: str, selector: str | None, node_ids: tuple[str, ...]) -> None:
    """Remove an assignment."""
    stub = bundle_pb2_grpc.BundleServiceStub(channel(server))
    request = bundle_pb2.UnassignBundleRequest(project=project, target=_target(selector, node_ids))
    call(lambda: stub.UnassignBundle(request))
