"""`serve --workers`: a count or `auto`; anything else stops before any work, naming the flag."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from controlplane.cli.serve import _workers, serve
from controlplane.cli.workers import cpu_count


@pytest.mark.parametrize("value", ["zero", "0", "-2", "257", "1.5"])
def test_a_bad_count_is_refused_naming_the_flag(tmp_path: Path, value: str) -> None:
    result = CliRunner().invoke(serve, ["--data-dir", str(tmp_path / "data"), "--workers", value])
    assert result.exit_code == 2, result.output
    assert "--workers" in result.output and value in result.output
    # Refused before the first-start work: no data directory was made.
    assert not (tmp_path / "data").exists()


def test_auto_is_one_per_core_this_process_may_use() -> None:
    assert _workers("auto") == _workers("AUTO") == cpu_count() >= 1
    assert _workers("3") == 3
