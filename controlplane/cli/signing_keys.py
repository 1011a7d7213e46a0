"""`controlplane signing-keys ...`: the keys bundles are signed with."""

from __future__ import annotations

import click

from controlplane.api.bundle.v1 import signing_pb2, signing_pb2_grpc
from controlplane.cli import output
from controlplane.cli.client import call, channel, print_message, server_option, unary
from controlplane.cli.lazy import LazyGroup
from controlplane.cli.output import OutputCommand
from controlplane.trusted_keys import keys_document


class OutputLazyGroup(LazyGroup):
    command_class = OutputCommand


@click.group(
    "signing-keys",
    cls=OutputLazyGroup,
    lazy={"generate": ("controlplane.cli.keygen:generate", "Make a new Ed25519 signing key.")},
)
def signing_keys() -> None:
    """Bundle signing keys: list them for agents, retire old ones, make new ones."""


@signing_keys.command("list")
@server_option
def list_keys(server: str) -> None:
    """The keys bundles are signed with. With -o json (or --json): {"keys": [...]} with
    base64 public keys, the file agents take as --trusted-keys."""
    stub = signing_pb2_grpc.SigningKeyServiceStub(channel(server))
    reply = unary(lambda: stub.ListSigningKeys(signing_pb2.ListSigningKeysRequest()))
    if output.current_format() == "json":
        click.echo(keys_document(reply.keys))
    else:
        print_message(reply)


@signing_keys.command("retire")
@server_option
@click.argument("key_id")
def retire(server: str, key_id: str) -> None:
    """Stop trusting KEY_ID; current assignments are signed again with an active key."""
    stub = signing_pb2_grpc.SigningKeyServiceStub(channel(server))
    call(lambda: stub.RetireSigningKey(signing_pb2.RetireSigningKeyRequest(signing_key_id=key_id)))
