"""`controlplane signing-keys generate`: make signing key material on this host. Not an
operator call (nothing goes over the wire): it needs the server's own key handling."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import click

from controlplane.domain.bundles.signing import Signer
from controlplane.keyfiles import write_private


@click.command("generate")
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
