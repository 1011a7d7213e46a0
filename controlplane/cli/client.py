"""What every operator command shares: where the server is, how to call it, how to print."""

from __future__ import annotations

import collections
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from controlplane.cli.servers import ServerChannel, split_servers

server_option = click.option(
    "--server",
    default="127.0.0.1:50051",
    show_default=True,
    envvar="CONTROLPLANE_SERVER",
    show_envvar=True,
    help="host:port; several (replicas) separated by commas.",
)
project_option = click.option(
    "--project", default="default", show_default=True, envvar="CONTROLPLANE_PROJECT", show_envvar=True
)


F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Connection:
    """How operator commands reach the server: the API key they call with, and TLS."""

    api_key: str = ""
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str = ""


_connection = Connection()
_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_CONNECTION_OPTIONS = [
    click.option(
        "--api-key",
        default="",
        envvar="CONTROLPLANE_API_KEY",
        show_envvar=True,
        help="API key for operator commands; default: <CONTROLPLANE_DATA_DIR or ./data>/admin-key "
        "when readable (the first-start admin key of a local server).",
    ),
    click.option(
        "--tls-ca",
        type=_FILE,
        default=None,
        envvar="CONTROLPLANE_TLS_CA",
        show_envvar=True,
        help="CA of the server's certificate; enables TLS.",
    ),
    click.option(
        "--tls-cert",
        type=_FILE,
        default=None,
        envvar="CONTROLPLANE_TLS_CLIENT_CERT",
        show_envvar=True,
        help="Client certificate, for a server that requires mutual TLS.",
    ),
    click.option(
        "--tls-key", type=_FILE, default=None, envvar="CONTROLPLANE_TLS_CLIENT_KEY", show_envvar=True
    ),
    click.option(
        "--tls-server-name",
        default="",
        envvar="CONTROLPLANE_TLS_SERVER_NAME",
        show_envvar=True,
        help="Name expected in the server certificate, when not the --server host.",
    ),
]


def connection_options(command: F) -> F:
    """The options of `controlplane` itself that every operator command connects with."""
    for option in reversed(_CONNECTION_OPTIONS):
        command = option(command)
    return command


def configure(**options: Any) -> None:
    global _connection
    _connection = replace(Connection(), **options)


def default_api_key() -> str:
    """The first-start admin key of a server running here, if this user can read it."""
    path = Path(os.environ.get("CONTROLPLANE_DATA_DIR", "data")) / "admin-key"
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def channel(server: str) -> Any:
    """A channel to `server`: one address, or several separated by commas, used one at a
    time (cli/servers.py)."""
    return ServerChannel(split_servers(server), _open)


def _open(server: str) -> grpc.Channel:
    c = _connection
    if c.tls_ca is None:
        base = grpc.insecure_channel(server)
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=c.tls_ca.read_bytes(),
            private_key=c.tls_key.read_bytes() if c.tls_key is not None else None,
            certificate_chain=c.tls_cert.read_bytes() if c.tls_cert is not None else None,
        )
        options = [("grpc.ssl_target_name_override", c.tls_server_name)] if c.tls_server_name else []
        base = grpc.secure_channel(server, credentials, options=options)
    key = c.api_key or default_api_key()
    return grpc.intercept_channel(base, _Bearer(key)) if key else base


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds `authorization: Bearer <API key>` to every call that carries none."""

    def __init__(self, key: str):
        self._key = key

    def _sign(self, details: Any) -> Any:
        metadata = list(details.metadata or ())
        if not any(k == "authorization" for k, _ in metadata):
            metadata.append(("authorization", f"Bearer {self._key}"))
        return _Details(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._sign(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._sign(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._sign(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._sign(details), request_iterator)


class _Details(
    collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready")),
    grpc.ClientCallDetails,  # type: ignore[misc]
):
    pass


def print_message(message: Message, show_defaults: bool = False) -> None:
    """`show_defaults` also prints fields at their default (a `0` that is an answer)."""
    click.echo(
        json_format.MessageToJson(
            message,
            preserving_proto_field_name=True,
            indent=2,
            always_print_fields_with_no_presence=show_defaults,
        )
    )


def call(fn: Callable[[], Message], show_defaults: bool = False) -> None:
    """Make one call and print its answer as JSON; a failed call becomes a clean error."""
    try:
        print_message(fn(), show_defaults)
    except grpc.RpcError as e:
        raise click.ClickException(f"{e.code().name}: {e.details()}") from None


def labels(pairs: tuple[str, ...]) -> dict[str, str]:
    """`key=value` pairs (each may hold several, comma-separated) as a map; the server
    checks keys and values and names the one it refuses."""
    found: dict[str, str] = {}
    for pair in pairs:
        for item in filter(None, (p.strip() for p in pair.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise click.BadParameter(f"{item!r} is not of the form key=value")
            if key in found:
                raise click.BadParameter(f"label {key!r} given twice")
            found[key] = value
    return found
