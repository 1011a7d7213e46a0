from __future__ import annotations

from typing import Any

import click

from controlplane import __version__
from controlplane.cli import audit, bundles, client, db, keys, nodes, projects, serve, signing_keys
from controlplane.cli.rollouts import drift, rollout
from controlplane.cli.simulate import simulate


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__)
@client.connection_options
def cli(**connection: Any) -> None:
    """Fleet control plane for reverse proxies."""
    client.configure(**connection)


cli.add_command(serve.serve)
cli.add_command(db.db)
cli.add_command(projects.projects)
cli.add_command(nodes.nodes)
cli.add_command(bundles.bundle)
cli.add_command(bundles.assign)
cli.add_command(bundles.unassign)
cli.add_command(signing_keys.signing_keys)
cli.add_command(rollout)
cli.add_command(drift)
cli.add_command(simulate)
cli.add_command(keys.keys)
cli.add_command(keys.enrollment)
cli.add_command(audit.audit)


def main() -> None:
    cli()
