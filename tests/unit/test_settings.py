"""Settings are defined once: `serve` with no options runs on exactly `Settings()`, so
tests (which build Settings) and production (which parses flags) share their defaults."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import pytest
from click.testing import CliRunner

from controlplane.cli import serve as serve_cli
from controlplane.config import DEFAULTS, Settings


def parsed(args: list[str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    seen: list[Settings] = []
    monkeypatch.setattr(serve_cli, "_run", seen.append)
    for name in [f.name for f in fields(Settings)]:
        monkeypatch.delenv(f"CONTROLPLANE_{name.upper()}", raising=False)
    result = CliRunner().invoke(serve_cli.serve, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return seen[0]


def test_serve_without_options_runs_on_the_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parsed([], monkeypatch) == DEFAULTS


def test_every_option_reaches_its_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    given = parsed(
        [
            "--offline-after",
            "12",
            "--rollout-tick",
            "0.2",
            "--retain-revisions",
            "7",
            "--max-bundle-bytes",
            "99",
        ],
        monkeypatch,
    )
    changes: dict[str, Any] = {
        "offline_after": given.offline_after,
        "offline_sweep_interval": given.offline_sweep_interval,
        "rollout_tick": given.rollout_tick,
        "retain_revisions": 7,
        "max_bundle_bytes": 99,
    }
    assert given == replace(DEFAULTS, **changes)
    assert given.offline_after.total_seconds() == 12 and given.rollout_tick.total_seconds() == 0.2


def test_the_node_ca_needs_a_tls_port(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    ca = tmp_path / "nodes.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    for name in [f.name for f in fields(Settings)]:
        monkeypatch.delenv(f"CONTROLPLANE_{name.upper()}", raising=False)
    refused = CliRunner().invoke(serve_cli.serve, ["--tls-node-ca", str(ca)])
    assert refused.exit_code != 0 and "--tls-node-ca needs --tls-cert and --tls-key" in refused.output
    given = parsed(["--tls-cert", str(ca), "--tls-key", str(ca), "--tls-node-ca", str(ca)], monkeypatch)
    assert given.tls_node_ca == ca and given.tls_client_ca is None
