"""The systemd units pass `systemd-analyze verify`, run against a root holding the
system's own units and the two console scripts where the units expect them
(/usr/local/bin), so the check covers their commands too; a broken unit fails it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def _verify(root: Path, units: list[Path]) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed (Debian's systemd package)")
    etc = root / "etc" / "systemd" / "system"
    etc.mkdir(parents=True, exist_ok=True)
    placed = []
    for unit in units:
        shutil.copy(unit, etc / unit.name)
        placed.append(str(etc / unit.name))
    return subprocess.run(
        [analyze, "verify", f"--root={root}", *placed],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "usr" / "lib" / "systemd").mkdir(parents=True)
    shutil.copytree(SYSTEM_UNITS, tmp_path / "usr" / "lib" / "systemd" / "system", symlinks=True)
    bin_dir = tmp_path / "usr" / "local" / "bin"
    bin_dir.mkdir(parents=True)
    for script in ("controlplane", "agent-stub"):
        target = Path(sys.executable).parent / script
        (bin_dir / script).write_text(f'#!/bin/sh\nexec {target} "$@"\n')
        (bin_dir / script).chmod(0o755)
    return tmp_path


def test_the_units_verify(root: Path) -> None:
    assert {u.name for u in UNITS} == {"controlplane.service", "controlplane-agent.service"}
    result = _verify(root, UNITS)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_a_broken_unit_does_not(root: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.service"
    text = (ROOT / "deploy" / "systemd" / "controlplane.service").read_text()
    broken.write_text(
        text.replace("/usr/local/bin/controlplane serve", "/usr/local/bin/no-such-program serve")
    )
    result = _verify(root, [broken])
    assert result.returncode != 0 and "no-such-program" in result.stderr, result.stderr
