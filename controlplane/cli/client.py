"""What every operator command shares: where the server is, how to call it, how to print."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import click
from google.protobuf.message import Message

from controlplane.cli import output

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
M = TypeVar("M", bound=Message)


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
    return _data_file("admin-key")


def default_enrollment_token() -> str:
    """The first-start enrollment token of a server running here, if readable."""
    return _data_file("enrollment-token")


def _data_file(name: str) -> str:
    path = Path(os.environ.get("CONTROLPLANE_DATA_DIR", "data")) / name
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def channel(server: str) -> Any:
    """A channel to `server` — one address, or several separated by commas, used one at
    a time (cli/servers.py) — carrying this invocation's API key and TLS settings. grpc is
    imported here, not with the command line: `--help` never loads it."""
    from controlplane.cli.servers import ServerChannel, split_servers

    return ServerChannel(split_servers(server), _open)


def _open(server: str, as_operator: bool = True) -> Any:
    from controlplane.cli.channel import open_channel

    c = _connection
    key = (c.api_key or default_api_key()) if as_operator else ""
    return open_channel(server, key, c.tls_ca, c.tls_cert, c.tls_key, c.tls_server_name)


def node_channel(server: str) -> Any:
    """A channel to `server` (the first of several) with TLS but no API key: for calls a
    node makes itself, such as RegisterNode with an enrollment token."""
    from controlplane.cli.servers import split_servers

    return _open(split_servers(server)[0], as_operator=False)


def print_message(message: Message, show_defaults: bool = False) -> None:
    """Print an answer in the command's format (-o table|json|yaml; cli/output.py)."""
    output.show(message, show_defaults)


def call(fn: Callable[[], Message], show_defaults: bool = False) -> None:
    """Make one call and print its answer; a failed call becomes a one-line error."""
    import grpc

    try:
        reply = fn()
    except grpc.RpcError as e:
        raise output.fail(e) from None
    output.show(reply, show_defaults)


def call_pages(
    fetch: Callable[[str, int], M], items: str, limit: int, all_pages: bool, what: str = "records"
) -> None:
    """A list call, paged (`fetch(page_token, page_size)`) up to `limit` records or all of
    them, printed as one answer; more than shown is said on stderr, never cut silently."""
    import grpc

    try:
        reply = output.fetch_pages(fetch, items, limit, all_pages, what)
    except grpc.RpcError as e:
        raise output.fail(e) from None
    output.show(reply)


def unary(fn: Callable[[], M]) -> M:
    """Make one call; a failed call becomes a one-line error."""
    import grpc

    try:
        return fn()
    except grpc.RpcError as e:
        raise output.fail(e) from None


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
