"""`controlplane serve` options of identity and transport security: TLS, node token
keys, rate limits."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from controlplane.config import DEFAULTS, seconds
from controlplane.domain.kernel.errors import InvalidArgument
from controlplane.rpc.ratelimit import RateLimit, RateLimits

F = TypeVar("F", bound=Callable[..., Any])
_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def _rate_defaults() -> str:
    limits = [(name, DEFAULTS.rate_limits.of(name)) for name in RateLimits.__dataclass_fields__]
    return " ".join(f"{name}={limit.rate:g}:{limit.burst:g}" for name, limit in limits)


_OPTIONS = [
    click.option(
        "--tls-cert",
        type=_FILE,
        default=None,
        envvar="CONTROLPLANE_TLS_CERT",
        show_envvar=True,
        help="PEM certificate (chain) of the gRPC port; with --tls-key, the port speaks TLS only.",
    ),
    click.option("--tls-key", type=_FILE, default=None, envvar="CONTROLPLANE_TLS_KEY", show_envvar=True),
    click.option(
        "--tls-client-ca",
        type=_FILE,
        default=None,
        envvar="CONTROLPLANE_TLS_CLIENT_CA",
        show_envvar=True,
        help="Mutual TLS: every client must present a certificate signed by this CA.",
    ),
    click.option(
        "--tls-node-ca",
        type=_FILE,
        default=None,
        envvar="CONTROLPLANE_TLS_NODE_CA",
        show_envvar=True,
        help="Mutual TLS for nodes: certificates this CA signs identify the node their URI SAN "
        "urn:controlplane:node:<project>:<node id> names on its xDS streams (docs/xds.md). "
        "Every client must then present a certificate of this CA or --tls-client-ca.",
    ),
    click.option(
        "--xds-enrollment/--no-xds-enrollment",
        default=False,
        envvar="CONTROLPLANE_XDS_ENROLLMENT",
        show_envvar=True,
        help="An Envoy whose xDS streams carry an enrollment token registers itself on first "
        "contact, its node.id the name (autoscaled fleets, docs/xds.md).",
    ),
    click.option(
        "--xds-metadata-labels/--no-xds-metadata-labels",
        default=False,
        envvar="CONTROLPLANE_XDS_METADATA_LABELS",
        show_envvar=True,
        help="With --xds-enrollment: an Envoy enrolled on first contact takes its labels from its "
        "node.metadata `labels` struct, at every contact, unless an operator has set them.",
    ),
    click.option(
        "--token-signing-key",
        default="",
        envvar="CONTROLPLANE_TOKEN_SIGNING_KEY",
        show_envvar=True,
        help="Ed25519 PEM private key (a path, or the PEM) node tokens are signed with; "
        "default: <data-dir>/token-signing-key.pem, made on first start.",
    ),
    click.option(
        "--token-verify-key",
        "token_verify_keys",
        multiple=True,
        envvar="CONTROLPLANE_TOKEN_VERIFY_KEYS",
        show_envvar=True,
        help="Another PEM key node tokens may be signed with: the previous key during a rotation "
        "(repeatable).",
    ),
    click.option(
        "--node-token-ttl",
        # At most the default history retention: a revocation must stay in the log for
        # as long as tokens issued before it live (docs/security.md).
        type=click.FloatRange(60, 3600),
        default=seconds(DEFAULTS.node_token_ttl),
        show_default=True,
        envvar="CONTROLPLANE_NODE_TOKEN_TTL",
        show_envvar=True,
        help="Seconds a node token lives; keep it at most --retain-seconds.",
    ),
    click.option(
        "--rate-limit",
        "rate_limits",
        multiple=True,
        envvar="CONTROLPLANE_RATE_LIMIT",
        show_envvar=True,
        help="CLASS=RATE[:BURST] calls per second per identity, CLASS one of operator, node, "
        f"anonymous, watch; 0 disables (repeatable). Defaults: {_rate_defaults()}.",
    ),
]

NAMES = (
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "tls_node_ca",
    "xds_enrollment",
    "xds_metadata_labels",
    "token_signing_key",
    "token_verify_keys",
    "node_token_ttl",
)


def security_options(command: F) -> F:
    for option in reversed(_OPTIONS):
        command = option(command)
    return command


def security_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The Settings fields of the options above (taken out of `options`)."""
    values = {name: options.pop(name) for name in NAMES}
    if (values["tls_cert"] is None) != (values["tls_key"] is None):
        raise click.BadParameter("give both --tls-cert and --tls-key, or neither")
    if values["tls_client_ca"] is not None and values["tls_cert"] is None:
        raise click.BadParameter("--tls-client-ca needs --tls-cert and --tls-key")
    if values["tls_node_ca"] is not None and values["tls_cert"] is None:
        raise click.BadParameter("--tls-node-ca needs --tls-cert and --tls-key")
    if values["xds_metadata_labels"] and not values["xds_enrollment"]:
        raise click.BadParameter("--xds-metadata-labels needs --xds-enrollment")
    values["token_verify_keys"] = tuple(values["token_verify_keys"])
    values["node_token_ttl"] = timedelta(seconds=values["node_token_ttl"])
    values["rate_limits"] = parse_rate_limits(options.pop("rate_limits"))
    return values


def parse_rate_limits(items: tuple[str, ...]) -> RateLimits:
    limits = RateLimits()
    changes: dict[str, RateLimit] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in RateLimits.__dataclass_fields__:
            raise click.BadParameter(
                f"{item!r}: expected CLASS=RATE[:BURST], CLASS one of operator, node, anonymous, watch"
            )
        try:
            changes[name] = RateLimit.parse(value, f"rate_limit.{name}")
        except InvalidArgument as e:
            raise click.BadParameter(str(e)) from None
    return RateLimits(**{**{f: limits.of(f) for f in RateLimits.__dataclass_fields__}, **changes})
