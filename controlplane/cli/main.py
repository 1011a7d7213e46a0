from __future__ import annotations

import click

from controlplane import __version__
from controlplane.cli import bundles, db, nodes, projects, serve, signing_keys
from controlplane.cli.rollouts import drift, rollout
from controlplane.cli.simulate import simulate


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__)
def cli() -> None:
    """Fleet control plane for reverse proxies."""


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


def main() -> None:
    cli()
