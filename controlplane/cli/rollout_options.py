"""`serve` options of rollouts, leases and drift (kept here so serve.py stays short)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import click

from controlplane.config import DEFAULTS, seconds

F = TypeVar("F", bound=Callable[..., Any])

_OPTIONS = (
    click.option(
        "--rollout-tick",
        type=click.FloatRange(0.01, 60),
        default=seconds(DEFAULTS.rollout_tick),
        show_default=True,
        envvar="CONTROLPLANE_ROLLOUT_TICK",
        show_envvar=True,
        help="Seconds between rollout driver passes when nothing wakes it.",
    ),
    click.option(
        "--lease-ttl",
        type=click.FloatRange(1, 600),
        default=seconds(DEFAULTS.lease_ttl),
        show_default=True,
        envvar="CONTROLPLANE_LEASE_TTL",
        show_envvar=True,
        help="Seconds a replica's lease on a rollout (or the drift sweep) lasts unrenewed; "
        "a dead process's leases are taken at once.",
    ),
    click.option(
        "--replica-id",
        default="",
        envvar="CONTROLPLANE_REPLICA_ID",
        show_envvar=True,
        help="This replica's name in leases and logs (default: the host name).",
    ),
    click.option(
        "--drift-interval",
        type=click.FloatRange(0.1, 3600),
        default=seconds(DEFAULTS.drift_interval),
        show_default=True,
        envvar="CONTROLPLANE_DRIFT_INTERVAL",
        show_envvar=True,
        help="Seconds between drift sweeps.",
    ),
    click.option(
        "--drift-grace",
        type=click.FloatRange(0, 86400),
        default=seconds(DEFAULTS.drift_grace),
        show_default=True,
        envvar="CONTROLPLANE_DRIFT_GRACE",
        show_envvar=True,
        help="Seconds a node may differ from its desired bundle before it counts as drifted.",
    ),
)
NAMES = ("rollout_tick", "lease_ttl", "drift_interval", "drift_grace")


def rollout_options(fn: F) -> F:
    for option in reversed(_OPTIONS):
        fn = option(fn)
    return fn


def rollout_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The Settings fields of the options above (taken out of `options`)."""
    return {
        **{name: timedelta(seconds=options.pop(name)) for name in NAMES},
        "replica_id": options.pop("replica_id"),
    }
