"""`controlplane simulate`: a fleet of simulated nodes (the real agent, simulated applies)
for demos, tests and benchmarks, with a running summary."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from pathlib import Path

import click

from agent_stub.backoff import BackoffPolicy
from agent_stub.simulator import FleetConfig, FleetSimulator, MetricsProfile
from controlplane.cli.client import default_enrollment_token, project_option, server_option
from controlplane.cli.client import labels as parse_labels
from controlplane.cli.rollouts import parse_duration


def _profiles(items: tuple[str, ...], base: MetricsProfile) -> dict[str, MetricsProfile]:
    out = {}
    for item in items:
        prefix, sep, spec = item.partition(":")
        if prefix == "sha256" and sep:
            more, sep, spec = spec.partition(":")
            prefix = f"sha256:{more}"
        if not sep or not prefix:
            raise click.BadParameter(f"{item!r}: use DIGEST_PREFIX:name=value[,name=value]")
        try:
            out[prefix] = MetricsProfile.parse(spec, base)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    return out


@click.command()
@server_option
@project_option
@click.option("--token", envvar="CONTROLPLANE_ENROLLMENT_TOKEN", show_envvar=True, help="Enrollment token.")
@click.option(
    "--token-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="File holding the enrollment token (default: data/enrollment-token when readable).",
)
@click.option("--nodes", type=click.IntRange(1, 100_000), default=10, show_default=True)
@click.option("--labels", "label_pairs", multiple=True, default=("env=dev",), show_default=True)
@click.option("--name-prefix", default="sim", show_default=True, help="Nodes are <prefix>-0000, ...")
@click.option(
    "--failure-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Share of applies NACKed.",
)
@click.option("--apply-delay", default="0s", show_default=True, help="How long an apply takes (+/- 20 %).")
@click.option(
    "--metrics", "base_metrics", default="", help="Heartbeat metrics: error_rate=0.01,p99=40,cpu=20,..."
)
@click.option(
    "--bundle-metrics",
    multiple=True,
    help="Metrics of nodes running a bundle: DIGEST_PREFIX:error_rate=0.3,p99=900 (repeat). "
    "Makes a canary bad on purpose.",
)
@click.option(
    "--fail-bundle", multiple=True, help="Every node NACKs bundles with this digest prefix (repeat)."
)
@click.option(
    "--heartbeat-interval", type=float, default=10.0, show_default=True, help="Until the server says."
)
@click.option("--no-download", is_flag=True, help="Skip downloading archives (apply without the bytes).")
@click.option("--summary-every", default="5s", show_default=True, help="Print a fleet summary this often.")
@click.option("--duration", default="0s", show_default=True, help="Stop after this long (0: until Ctrl-C).")
@click.option("--seed", type=int, default=None, help="Random seed for failures and metrics noise.")
def simulate(
    server: str,
    project: str,
    token: str | None,
    token_file: Path | None,
    nodes: int,
    label_pairs: tuple[str, ...],
    name_prefix: str,
    failure_rate: float,
    apply_delay: str,
    base_metrics: str,
    bundle_metrics: tuple[str, ...],
    fail_bundle: tuple[str, ...],
    heartbeat_interval: float,
    no_download: bool,
    summary_every: str,
    duration: str,
    seed: int | None,
) -> None:
    """Run NODES simulated nodes against a control plane: each is the real agent over
    real gRPC (registration, watch, reports, heartbeats); applying is simulated."""
    if token_file is not None:
        token = token_file.read_text().strip()
    if not token:
        # Run next to a local server (as `make run` makes one): its first-start token.
        token = default_enrollment_token()
    if not token:
        raise click.UsageError(
            "give --token or --token-file (the project's enrollment token; default: "
            "<CONTROLPLANE_DATA_DIR or ./data>/enrollment-token when readable)"
        )
    try:
        base = MetricsProfile.parse(base_metrics)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--metrics") from None
    config = FleetConfig(
        server=server,
        project=project,
        token=token,
        nodes=nodes,
        labels=parse_labels(label_pairs),
        name_prefix=name_prefix,
        failure_rate=failure_rate,
        apply_delay=parse_duration(apply_delay).total_seconds(),
        download=not no_download,
        metrics=base,
        bundle_metrics=_profiles(bundle_metrics, base),
        fail_bundles=set(fail_bundle),
        heartbeat_interval=heartbeat_interval,
        backoff=BackoffPolicy(base=0.5, cap=10.0),
        seed=seed,
    )
    every = max(0.5, parse_duration(summary_every).total_seconds())
    limit = parse_duration(duration).total_seconds()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(FleetSimulator(config), every, limit))


async def _run(sim: FleetSimulator, every: float, limit: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    click.echo(
        f"simulating {len(sim.nodes)} node(s) against {sim.config.server} (project {sim.config.project})"
    )
    await sim.start()
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await stop.wait()
            elapsed = time.monotonic() - started
            click.echo(f"{elapsed:7.1f}s  {sim.summary().line()}")
            sys.stdout.flush()
            if limit and elapsed >= limit:
                break
    finally:
        await sim.stop()
        click.echo(f"stopped: {sim.summary().line()}")
