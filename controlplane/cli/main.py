"""`controlplane`: every subcommand is imported only when it runs (`LazyGroup`)."""

from __future__ import annotations

import sys
from typing import Any

import click

from controlplane import __version__
from controlplane.cli import client, output
from controlplane.cli.lazy import LazyGroup

# name: (where the command lives, its line in --help)
COMMANDS = {
    "serve": ("controlplane.cli.serve:serve", "Run the control plane."),
    "db": ("controlplane.cli.db:db", "Database schema."),
    "projects": ("controlplane.cli.projects:projects", "Projects."),
    "nodes": ("controlplane.cli.nodes:nodes", "Nodes."),
    "envoy": ("controlplane.cli.envoy:envoy", "Envoy nodes over xDS: enroll one, print its bootstrap."),
    "bundle": ("controlplane.cli.bundles:bundle", "Bundles: push, inspect, compare, revoke; validators."),
    "assign": ("controlplane.cli.bundles:assign", "Set the desired bundle of a selector's or listed nodes."),
    "unassign": ("controlplane.cli.bundles:unassign", "Remove an assignment."),
    "signing-keys": ("controlplane.cli.signing_keys:signing_keys", "Bundle signing keys."),
    "rollout": (
        "controlplane.cli.rollouts:rollout",
        "Rollouts: move nodes to a bundle, safely.",
    ),
    "drift": (
        "controlplane.cli.rollouts:drift",
        "Nodes off their desired bundle.",
    ),
    "notify": ("controlplane.cli.notify:notify", "Notifications: channels and delivered messages."),
    "simulate": ("controlplane.cli.simulate:simulate", "Run a simulated fleet of agents."),
    "keys": ("controlplane.cli.keys:keys", "API keys of operators and services."),
    "enrollment": ("controlplane.cli.keys:enrollment", "Enrollment tokens and node identities."),
    "audit": ("controlplane.cli.audit:audit", "The tamper-evident audit log."),
}


@click.group(
    cls=LazyGroup,
    lazy=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__)
@client.connection_options
def cli(**connection: Any) -> None:
    """Fleet control plane for reverse proxies."""
    client.configure(**connection)


def main() -> None:
    try:
        cli()
    except Exception as e:
        # A call no command caught (grpc is not imported here: `--help` never loads it).
        if type(e).__module__.startswith("grpc") and callable(getattr(e, "code", None)):
            click.echo(f"Error: {output.fail(e).message}", err=True)
            sys.exit(1)
        raise
