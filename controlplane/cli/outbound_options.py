"""`serve` options of the calls the control plane makes outward (metric analysis,
notifications), of Prometheus's HTTP service discovery and of the periodic audit-chain
verification (kept here so serve.py stays short)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import click

from controlplane.config import DEFAULTS, seconds

F = TypeVar("F", bound=Callable[..., Any])

_OPTIONS = (
    click.option(
        "--outbound-allow",
        multiple=True,
        envvar="CONTROLPLANE_OUTBOUND_ALLOW",
        show_envvar=True,
        help="A network (CIDR) the control plane may call although it is loopback, link-local "
        "or otherwise internal (metric providers, webhooks); repeatable. Refused by default.",
    ),
    click.option(
        "--http-sd-listen",
        default="",
        envvar="CONTROLPLANE_HTTP_SD_LISTEN",
        show_envvar=True,
        help="host:port of the HTTP service-discovery endpoint for Prometheus's http_sd_configs "
        "(GET /sd/nodes?project=P, an API key with the reader role); empty disables it.",
    ),
    click.option(
        "--notify-timeout",
        type=click.FloatRange(0.1, 120),
        default=seconds(DEFAULTS.notify_timeout),
        show_default=True,
        envvar="CONTROLPLANE_NOTIFY_TIMEOUT",
        show_envvar=True,
        help="Seconds one notification delivery attempt may take.",
    ),
    click.option(
        "--audit-verify-interval",
        type=click.FloatRange(1, 7 * 86400),
        default=seconds(DEFAULTS.audit_verify_interval),
        show_default=True,
        envvar="CONTROLPLANE_AUDIT_VERIFY_INTERVAL",
        show_envvar=True,
        help="Seconds between verifications of the whole audit chain (one replica; a failure is notified).",
    ),
)


def outbound_options(fn: F) -> F:
    for option in reversed(_OPTIONS):
        fn = option(fn)
    return fn


def outbound_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The Settings fields of the options above (taken out of `options`)."""
    return {
        "outbound_allow": tuple(options.pop("outbound_allow")),
        "http_sd_listen": options.pop("http_sd_listen"),
        "notify_timeout": timedelta(seconds=options.pop("notify_timeout")),
        "audit_verify_interval": timedelta(seconds=options.pop("audit_verify_interval")),
    }
