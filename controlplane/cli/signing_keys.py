"""`controlplane signing-keys ...`: the keys bundles are signed with."""

from __future__ import annotations

import click
import grpc

from controlplane.api.bundle.v1 import signing_pb2, signing_pb2_grpc
from controlplane.cli.client import call, channel, server_option
from controlplane.cli.lazy import LazyGroup
from controlplane.trusted_keys import keys_document


@click.group(
    "signing-keys",
    cls=LazyGroup,
    lazy={"generate": ("controlplane.cli.keygen:generate", "Make a new Ed25519 signing key.")},
)
def signing_keys() -> None:
    """Bundle signing keys: list them for agents, retire old ones, make new ones."""


@signing_keys.command("list")
@server_option
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print {"keys": [...]} with base64 public keys: the file agents take as --trusted-keys.',
)
def list_keys(server: str, as_json: bool) -> None:
    stub = signing_pb2_grpc.SigningKeyServiceStub(channel(server))
    if not as_json:
        call(lambda: stub.ListSigningKeys(signing_pb2.ListSigningKeysRequest()))
        return
    try:
        reply = stub.ListSigningKeys(signing_pb2.ListSigningKeysRequest())
    except grpc.RpcError as e:
        raise click.ClickException(f"{e.code().name}: {e.details()}") from None
    click.echo(keys_document(reply.keys))


@signing_keys.command("retire")
@server_option
@click.argument("key_id")
def retire(server: str, key_id: str) -> None:
    """Stop trusting KEY_ID; current assignments are signed again with an active key."""
    stub = signing_pb2_grpc.SigningKeyServiceStub(channel(server))
    call(lambda: stub.RetireSigningKey(signing_pb2.RetireSigningKeyRequest(signing_key_id=key_id)))
