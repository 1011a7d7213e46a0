from __future__ import annotations

import asyncio
import logging
import shlex
import signal
import socket
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from controlplane.bootstrap import METRICS_OPTION, App
from controlplane.cli.bundle_options import bundle_options, bundle_settings
from controlplane.cli.outbound_options import outbound_options, outbound_settings
from controlplane.cli.rollout_options import rollout_options, rollout_settings
from controlplane.cli.security_options import security_options, security_settings
from controlplane.cli.telemetry_options import TELEMETRY_KEYS, telemetry_options
from controlplane.cli.telemetry_options import setup as telemetry_setup
from controlplane.cli.workers import Supervisor, WorkerFailed, cpu_count
from controlplane.config import DEFAULTS, Settings, seconds
from controlplane.firststart import (
    NO_PROXY_NOTE,
    TRUSTED_KEYS_FILE,
    agent_command,
    agent_program,
    agent_proxy,
    write_trusted_keys,
)
from controlplane.rpc.server import LISTEN_OPTION, ListenError
from controlplane.watch.hub import HubSettings

# What to do once the server runs (README.md, A first session, has the whole walk).
NEXT_STEPS = """then, in another shell in this directory:
  . .venv/bin/activate                     # or run .venv/bin/controlplane
  controlplane bundle push DIR --version v1   # a directory of config files
  controlplane rollout create v1 --selector env=dev --watch
  controlplane nodes list
stop the server with Ctrl-C"""


def _check_free(address: str, option: str, what: str) -> None:
    """Refuse a taken port before the migrations run and grpc logs its own complaint.
    SO_REUSEADDR as grpc sets it: a port held only by closed connections is free."""
    host, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(port)))
        except OSError as e:
            raise ListenError(what, address, option, (e.strerror or str(e)).lower()) from None


def _announce(
    settings: Settings,
    port: int,
    metrics_port: int,
    admin_key: str | None,
    enrollment_token: str | None,
    token_created: bool,
) -> None:
    """The lines a start prints (README.md's first session quotes them)."""
    trusted_keys = settings.data_dir / TRUSTED_KEYS_FILE
    where = "SQLite in " + str(settings.data_dir) if settings.embedded else "PostgreSQL"
    bound = f"{settings.listen.rpartition(':')[0]}:{port}"  # port 0 becomes the real one
    click.echo(f"controlplane serving on {bound} (port {port}), state in {where}")
    if metrics_port:
        click.echo(f"metrics on http://{settings.metrics_listen.rpartition(':')[0]}:{metrics_port}/metrics")
    if admin_key:
        click.echo(
            "created a global admin API key; it is shown only now and kept in "
            f"{settings.data_dir / 'admin-key'} (readable only by you):\n  {admin_key}"
        )
    if enrollment_token:
        if token_created:
            token_file = settings.data_dir / "enrollment-token"
            click.echo(f"created project 'default'; its enrollment token is in {token_file}")
        proxy = agent_proxy()
        command = agent_command(settings.listen, port, enrollment_token, program=agent_program(), proxy=proxy)
        click.echo(f"start an agent with:\n  {command} --trusted-keys {shlex.quote(str(trusted_keys))}")
        if not proxy:
            click.echo(NO_PROXY_NOTE)
        click.echo(NEXT_STEPS)
    sys.stdout.flush()


def _run(settings: Settings) -> None:
    _check_free(settings.listen, LISTEN_OPTION, "listen")
    if settings.metrics_listen:
        _check_free(settings.metrics_listen, METRICS_OPTION, "serve metrics")

    async def main() -> None:
        app = App(settings)
        info = await app.start()
        # The public keys bundles are signed with, for agents' --trusted-keys: only those
        # this server can prove, never a key that is only a row (domain/bundles/key_trust.py).
        trusted_keys = settings.data_dir / TRUSTED_KEYS_FILE
        write_trusted_keys(trusted_keys, await app.signing_keys.trusted(), app.signing_keys.signer.key_id)
        _announce(
            settings, info.port, info.metrics_port, info.admin_key, info.enrollment_token, info.token_created
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        click.echo("shutting down: streams get a closing bookmark")
        await app.stop()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main())


def _run_workers(settings: Settings, count: int, telemetry: dict[str, Any], log_level: str) -> None:
    """Several serving processes on one port (cli/workers.py)."""
    _check_free(settings.listen, LISTEN_OPTION, "listen")
    if settings.metrics_listen:
        _check_free(settings.metrics_listen, METRICS_OPTION, "serve metrics")
    supervisor = Supervisor(settings, count, telemetry, log_level)
    try:
        try:
            ready = supervisor.start()
        except WorkerFailed as e:
            raise click.ClickException(str(e)) from None
        first = ready.first
        _announce(
            settings,
            ready.port,
            ready.metrics_port,
            first.admin_key,
            first.enrollment_token,
            first.token_created,
        )
        supervisor.wait()
        click.echo("shutting down: streams get a closing bookmark")
    finally:
        supervisor.stop()


def _workers(value: str) -> int:
    """`--workers`: a count, or `auto` for one per core."""
    if value.strip().lower() == "auto":
        return cpu_count()
    try:
        count = int(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is neither a number nor 'auto'", param_hint="--workers"
        ) from None
    if not 1 <= count <= 256:
        raise click.BadParameter(f"{count} is not between 1 and 256", param_hint="--workers")
    return count


@click.command()
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=DEFAULTS.data_dir,
    show_default=True,
    envvar="CONTROLPLANE_DATA_DIR",
    show_envvar=True,
    help="SQLite file, blobs, keys.",
)
@click.option(
    "--listen",
    default=DEFAULTS.listen,
    show_default=True,
    envvar="CONTROLPLANE_LISTEN",
    show_envvar=True,
    help="gRPC address (host:port; port 0 picks a free one).",
)
@click.option(
    "--database-url",
    default=DEFAULTS.database_url,
    envvar="CONTROLPLANE_DATABASE_URL",
    show_envvar=True,
    help="postgresql+asyncpg://... (default: SQLite in the data dir).",
)
@click.option(
    "--metrics-listen",
    default=DEFAULTS.metrics_listen,
    show_default=True,
    envvar="CONTROLPLANE_METRICS_LISTEN",
    show_envvar=True,
    help="Prometheus endpoint host:port; empty to disable.",
)
@click.option(
    "--bookmark-interval",
    type=float,
    default=DEFAULTS.hub.bookmark_interval,
    show_default=True,
    envvar="CONTROLPLANE_BOOKMARK_INTERVAL",
    show_envvar=True,
    help="Seconds between bookmarks.",
)
@click.option(
    "--stream-lifetime",
    type=(float, float),
    default=(DEFAULTS.hub.lifetime_min, DEFAULTS.hub.lifetime_max),
    show_default=True,
    envvar="CONTROLPLANE_STREAM_LIFETIME",
    show_envvar=True,
    help="Min and max seconds a stream lives before a closing bookmark.",
)
@click.option(
    "--offline-after",
    type=float,
    default=seconds(DEFAULTS.offline_after),
    show_default=True,
    envvar="CONTROLPLANE_OFFLINE_AFTER",
    show_envvar=True,
    help="Seconds without a heartbeat before a node is marked offline.",
)
@click.option(
    "--gate-stale-after",
    type=click.FloatRange(0.1, 86400),
    default=None,
    envvar="CONTROLPLANE_GATE_STALE_AFTER",
    show_envvar=True,
    help="Seconds after which a heartbeat is too old for a health gate (default: --offline-after).",
)
@click.option(
    "--heartbeat-interval",
    type=float,
    default=seconds(DEFAULTS.heartbeat_interval),
    show_default=True,
    envvar="CONTROLPLANE_HEARTBEAT_INTERVAL",
    show_envvar=True,
    help="Seconds between heartbeats, told to agents.",
)
@click.option(
    "--retain-revisions",
    type=int,
    default=DEFAULTS.retain_revisions,
    show_default=True,
    envvar="CONTROLPLANE_RETAIN_REVISIONS",
    show_envvar=True,
    help="Revisions of history kept for resumes.",
)
@click.option(
    "--retain-seconds",
    type=float,
    default=seconds(DEFAULTS.retain_for),
    show_default=True,
    envvar="CONTROLPLANE_RETAIN_SECONDS",
    show_envvar=True,
    help="Minimum age of history before it may be pruned.",
)
@click.option(
    "--prune-interval",
    type=float,
    default=seconds(DEFAULTS.prune_interval),
    show_default=True,
    envvar="CONTROLPLANE_PRUNE_INTERVAL",
    show_envvar=True,
    help="Seconds between retention runs.",
)
@click.option(
    "--epoch-follows-timeline/--no-epoch-follows-timeline",
    default=None,
    hidden=True,
    envvar="CONTROLPLANE_EPOCH_FOLLOWS_TIMELINE",
    help="No longer has an effect: a promotion forks the epoch and resets only the nodes "
    "that saw lost revisions (docs/operations.md).",
)
@click.option(
    "--audit-key",
    default=DEFAULTS.audit_key,
    envvar="CONTROLPLANE_AUDIT_KEY",
    show_envvar=True,
    help="Hex HMAC key of the audit chain; default: <data-dir>/audit-key, made on first start.",
)
@click.option(
    "--workers",
    default="1",
    show_default=True,
    envvar="CONTROLPLANE_WORKERS",
    show_envvar=True,
    help="Serving processes sharing the port: a number, or 'auto' for one per core (docs/operations.md).",
)
@click.option(
    "--log-level", default="INFO", show_default=True, envvar="CONTROLPLANE_LOG_LEVEL", show_envvar=True
)
@bundle_options
@rollout_options
@security_options
@telemetry_options
@outbound_options
def serve(
    data_dir: Path,
    listen: str,
    database_url: str,
    metrics_listen: str,
    bookmark_interval: float,
    stream_lifetime: tuple[float, float],
    offline_after: float,
    gate_stale_after: float | None,
    heartbeat_interval: float,
    retain_revisions: int,
    retain_seconds: float,
    prune_interval: float,
    epoch_follows_timeline: bool | None,
    audit_key: str,
    workers: str,
    log_level: str,
    **bundle: Any,
) -> None:
    """Run the control plane (SQLite and a local directory unless --database-url)."""
    count = _workers(workers)
    # What each worker sets its logs and traces up with, as this process does.
    telemetry = {k: bundle[k] for k in TELEMETRY_KEYS}
    traces = telemetry_setup(bundle, log_level)
    if epoch_follows_timeline is not None:
        logging.getLogger(__name__).warning(
            "--epoch-follows-timeline no longer has an effect: a promoted standby presents a "
            "new epoch that resets only the nodes that saw lost revisions (docs/operations.md)"
        )
    lo, hi = sorted(stream_lifetime)
    settings = Settings(
        data_dir=data_dir,
        listen=listen,
        database_url=database_url,
        metrics_listen=metrics_listen,
        hub=HubSettings(bookmark_interval=bookmark_interval, lifetime_min=lo, lifetime_max=hi),
        heartbeat_interval=timedelta(seconds=heartbeat_interval),
        offline_after=timedelta(seconds=offline_after),
        offline_sweep_interval=timedelta(seconds=min(5.0, max(0.5, offline_after / 4))),
        gate_stale_after=None if gate_stale_after is None else timedelta(seconds=gate_stale_after),
        retain_revisions=retain_revisions,
        retain_for=timedelta(seconds=retain_seconds),
        prune_interval=timedelta(seconds=prune_interval),
        audit_key=audit_key,
        **bundle_settings(bundle),
        **rollout_settings(bundle),
        **security_settings(bundle),
        **outbound_settings(bundle),
    )
    try:
        if count > 1:
            _run_workers(settings, count, telemetry, log_level)
        else:
            _run(settings)
    except ListenError as e:
        # A busy port is an operator's everyday mistake: one line naming the option.
        raise click.ClickException(str(e)) from None
    finally:
        traces.shutdown()
