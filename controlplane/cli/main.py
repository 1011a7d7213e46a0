from __future__ import annotations

import click

from controlplane import __version__
from controlplane.cli import db, ops, serve


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__)
def cli() -> None:
    """Fleet control plane for reverse proxies."""


cli.add_command(serve.serve)
cli.add_command(db.db)
for command in ops.COMMANDS:
    cli.add_command(command)


def main() -> None:
    cli()
