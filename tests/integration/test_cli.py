"""The `controlplane` command line: db upgrade and the operator commands' errors."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from click.testing import CliRunner

from controlplane.cli.main import cli


def test_db_upgrade_creates_the_schema(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["db", "upgrade", "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    tables = {
        row[0]
        for row in sqlite3.connect(tmp_path / "d" / "controlplane.db").execute(
            "SELECT name FROM sqlite_master WHERE type='table'"
        )
    }
    assert {"desired_state_log", "revision_counter", "nodes", "bundles", "alembic_version"} <= tables


def test_db_upgrade_reads_the_environment(tmp_path: Path) -> None:
    env = {"CONTROLPLANE_DATA_DIR": str(tmp_path / "from-env")}
    result = CliRunner().invoke(cli, ["db", "upgrade"], env=env)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "from-env" / "controlplane.db").exists()


def test_operator_command_reports_unreachable_server() -> None:
    result = CliRunner().invoke(cli, ["nodes", "list", "--server", "127.0.0.1:1"])
    assert result.exit_code != 0
    assert "UNAVAILABLE" in result.output


def test_assign_needs_exactly_one_target() -> None:
    result = CliRunner().invoke(cli, ["assign", "sha256:" + "0" * 64])
    assert result.exit_code != 0
    assert "exactly one of --selector or --node" in result.output
