"""`controlplane signing-keys ...`: the keys bundles are signed with."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from pathlib import Path

import click
import grpc
from google.protobuf import json_format

from controlplane.api.bundle.v1 import signing_pb2, signing_pb2_grpc
from controlplane.cli.client import call, channel, server_option
from controlplane.domain.bundle_records import SigningKey
from controlplane.domain.signing import Signer
from controlplane.keyfiles import write_atomic, write_private
from controlplane.rpc.bundle_convert import signing_key_out

# Written into the data dir at every start of `serve`: what agents take as --trusted-keys.
TRUSTED_KEYS_FILE = "trusted-keys.json"


def keys_document(keys: Iterable[signing_pb2.SigningKey]) -> str:
    """The trusted-keys file agents read: {"keys": [...]} with base64 public keys."""
    body = [json_format.MessageToDict(k, preserving_proto_field_name=True) for k in keys]
    return json.dumps({"keys": body}, indent=2)


def write_trusted_keys(path: Path, keys: Iterable[SigningKey], signing_key_id: str) -> None:
    """Replace `path` with the public keys (atomically: an agent reading it meanwhile sees
    the old file or the new one). Public halves only, so readable by all."""
    text = keys_document(signing_key_out(k, signing_key_id) for k in keys) + "\n"
    write_atomic(path, text.encode(), 0o644)


@click.group("signing-keys")
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


@signing_keys.command("generate")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the private key (mode 0600); give it to serve as --signing-key-file.",
)
def generate(out: Path) -> None:
    """Make a new Ed25519 signing key; prints its id and public key."""
    if out.exists():
        raise click.ClickException(f"{out} exists; refusing to overwrite a key")
    signer = Signer.generate()
    write_private(out, signer.seed.hex().encode() + b"\n")
    click.echo(
        json.dumps(
            {
                "key_id": signer.key_id,
                "public_key": base64.b64encode(signer.public_key).decode(),
                "state": "ACTIVE",
            }
        )
    )
