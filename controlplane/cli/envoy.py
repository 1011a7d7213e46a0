"""`controlplane envoy ...`: Envoy nodes, which follow the control plane over xDS."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from controlplane.cli.client import (
    default_enrollment_token,
    labels,
    node_channel,
    project_option,
    server_option,
    unary,
)
from controlplane.cli.output import OutputGroup


@click.group(cls=OutputGroup)
def envoy() -> None:
    """Envoy nodes: no agent, their configuration over xDS (docs/xds.md)."""


@envoy.command("bootstrap")
@server_option
@project_option
@click.option("--node", "name", required=True, help="The node's name (enrolled under it if needed).")
@click.option("--labels", "label_pairs", multiple=True, help="env=prod,region=eu (at enrollment).")
@click.option("--token", envvar="CONTROLPLANE_ENROLLMENT_TOKEN", show_envvar=True, help="Enrollment token.")
@click.option(
    "--token-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="File holding the enrollment token (default: data/enrollment-token when readable).",
)
@click.option(
    "--credential-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where the node's id and credential are kept: read if it exists (no enrollment), "
    "else written (mode 0600) once the node is enrolled.",
)
@click.option(
    "--ads-address",
    default="",
    help="host:port Envoy dials for ADS and its stats (default: the first --server).",
)
@click.option("--mode", type=click.Choice(["delta", "sotw"]), default="delta", show_default=True)
@click.option("--admin-port", type=int, default=9901, show_default=True, help="Envoy's admin, on 127.0.0.1.")
@click.option(
    "--stats-flush", type=float, default=10.0, show_default=True, help="Seconds between stats flushes."
)
@click.option(
    "--ca-file",
    default="",
    help="TLS to the control plane: the CA file Envoy trusts for it (a path on the Envoy host).",
)
@click.option(
    "--cert-file", default="", help="Mutual TLS: Envoy's client certificate (a path on the Envoy host)."
)
@click.option("--key-file", default="", help="Mutual TLS: its private key (a path on the Envoy host).")
@click.option(
    "--server-name", default="", help="TLS: the name the control plane's certificate is checked for."
)
@click.option(
    "--identity",
    type=click.Choice(["credential", "certificate"]),
    default="credential",
    show_default=True,
    help="What identifies the node on its streams: its credential in the metadata, or its client "
    "certificate alone (a server with --tls-node-ca; docs/xds.md).",
)
@click.option(
    "--first-contact",
    is_flag=True,
    help="Enroll nothing: the bootstrap carries the enrollment token, and the Envoy enrolls "
    "itself as NAME on its first contact (a server with --xds-enrollment; --labels go into "
    "node.metadata, taken with --xds-metadata-labels). For autoscaled fleets (docs/xds.md).",
)
@click.option(
    "--output",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the bootstrap here (mode 0600) instead of standard output.",
)
def bootstrap(
    server: str,
    project: str,
    name: str,
    label_pairs: tuple[str, ...],
    token: str | None,
    token_file: Path | None,
    credential_file: Path | None,
    ads_address: str,
    mode: str,
    admin_port: int,
    stats_flush: float,
    ca_file: str,
    cert_file: str,
    key_file: str,
    server_name: str,
    identity: str,
    first_contact: bool,
    out: Path | None,
) -> None:
    """Enroll an Envoy as node NAME (unless --credential-file already holds it, or with
    --first-contact) and print the bootstrap it starts with: its node id, ADS and the
    stats sink to the control plane, its credential (or the enrollment token) in the gRPC
    initial metadata. The bootstrap holds that secret: keep it readable by the Envoy user
    only."""
    from controlplane.xds.bootstrap import NODE_URI, BootstrapSpec, Tls
    from controlplane.xds.bootstrap import bootstrap as build

    if bool(cert_file) != bool(key_file):
        raise click.BadParameter("give both --cert-file and --key-file, or neither", param_hint="--cert-file")
    if (cert_file or server_name) and not ca_file:
        raise click.BadParameter("TLS to the control plane needs its CA: --ca-file", param_hint="--ca-file")
    if identity == "certificate" and not cert_file:
        raise click.BadParameter(
            "--identity certificate needs the node's certificate: --cert-file and --key-file",
            param_hint="--identity",
        )
    metadata: dict[str, Any] = {}
    if first_contact:
        if credential_file is not None or identity == "certificate":
            raise click.BadParameter(
                "an Envoy enrolling on first contact holds the enrollment token, no credential "
                "or certificate of a node",
                param_hint="--first-contact",
            )
        # Its node.id is its name; the token stands in for the credential.
        node_id, credential = name, _enrollment_token(token, token_file)
        metadata = {"labels": labels(label_pairs)} if label_pairs else {}
    elif credential_file is not None and credential_file.exists():
        node_id, credential = _read_credential(credential_file)
    else:
        node_id, credential = _enroll(server, project, name, labels(label_pairs), token, token_file)
        if credential_file is not None:
            _write_private(credential_file, json.dumps({"node_id": node_id, "credential": credential}) + "\n")
        click.echo(f"enrolled {name!r} as node {node_id} in project {project!r}", err=True)
    host, port = _host_port(ads_address or server.split(",", maxsplit=1)[0].strip())
    spec = BootstrapSpec(
        node_id,
        project,
        host,
        port,
        "" if identity == "certificate" else credential,
        "sotw" if mode == "sotw" else "delta",
        admin_port,
        tls=Tls(ca_file, cert_file, key_file, server_name) if ca_file else None,
        metadata=metadata,
        stats_flush_seconds=stats_flush,
    )
    if identity == "certificate":
        click.echo(
            f"the certificate {cert_file} must carry the URI SAN {NODE_URI}{project}:{node_id}, "
            "signed by a CA of the server's --tls-node-ca",
            err=True,
        )
    text = json.dumps(build(spec), indent=2) + "\n"
    if out is None:
        click.echo(text, nl=False)
    else:
        _write_private(out, text)
        held = "no credential" if identity == "certificate" else "it holds the node credential"
        if first_contact:
            held = "it holds the enrollment token"
        click.echo(f"wrote {out} ({held})", err=True)


def _enroll(
    server: str,
    project: str,
    name: str,
    node_labels: dict[str, str],
    token: str | None,
    token_file: Path | None,
) -> tuple[str, str]:
    from controlplane.api.node.v1 import node_pb2, node_pb2_grpc

    token = _enrollment_token(token, token_file)
    stub = node_pb2_grpc.NodeServiceStub(node_channel(server))
    request = node_pb2.RegisterNodeRequest(
        project=project, enrollment_token=token, name=name, labels=node_labels, agent_version="envoy"
    )
    reply: Any = unary(lambda: stub.RegisterNode(request))
    return str(reply.node_id), str(reply.node_credential)


def _enrollment_token(token: str | None, token_file: Path | None) -> str:
    if token_file is not None:
        token = token_file.read_text().strip()
    token = token or default_enrollment_token()
    if not token:
        raise click.UsageError(
            "give --token or --token-file (the project's enrollment token), or --credential-file "
            "holding an enrolled node's credential"
        )
    return token


def _read_credential(path: Path) -> tuple[str, str]:
    try:
        held = json.loads(path.read_text())
        return str(held["node_id"]), str(held["credential"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise click.BadParameter(
            f"{path}: not a credential file ({e})", param_hint="--credential-file"
        ) from None


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def _host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise click.BadParameter(f"{address!r} is not host:port", param_hint="--ads-address")
    return host.strip("[]"), int(port)
