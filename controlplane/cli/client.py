"""What every operator command shares: where the server is, how to call it, how to print."""

from __future__ import annotations

from collections.abc import Callable

import click
import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from controlplane.domain.errors import InvalidArgument
from controlplane.domain.labels import parse_label_pairs

server_option = click.option(
    "--server", default="127.0.0.1:50051", show_default=True, envvar="CONTROLPLANE_SERVER", show_envvar=True
)
project_option = click.option(
    "--project", default="default", show_default=True, envvar="CONTROLPLANE_PROJECT", show_envvar=True
)


def channel(server: str) -> grpc.Channel:
    return grpc.insecure_channel(server)


def print_message(message: Message) -> None:
    click.echo(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2))


def call(fn: Callable[[], Message]) -> None:
    """Make one call and print its answer as JSON; a failed call becomes a clean error."""
    try:
        print_message(fn())
    except grpc.RpcError as e:
        raise click.ClickException(f"{e.code().name}: {e.details()}") from None


def labels(pairs: tuple[str, ...]) -> dict[str, str]:
    try:
        return parse_label_pairs(pairs)
    except InvalidArgument as e:
        raise click.BadParameter(str(e)) from None
