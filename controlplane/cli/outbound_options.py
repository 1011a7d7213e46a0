"""`serve` options of the calls the control plane makes outward (metric analysis) and of
Prometheus's HTTP service discovery (kept here so serve.py stays short)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

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
    }
