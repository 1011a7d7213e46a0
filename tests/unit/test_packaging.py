"""pyproject.toml lists the packages it ships (so migrations/ can ship inside
controlplane): every package on disk must be in that list, or an installed wheel (and the
container image) would lack it."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_on_disk_is_shipped() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("controlplane", "agent_stub")
        for init in (ROOT / top).rglob("__init__.py")
    }
    on_disk |= {"controlplane.migrations", "controlplane.migrations.versions"}
    missing = sorted(on_disk - listed)
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {missing}"
    gone = sorted(listed - on_disk)
    assert not gone, f"listed in pyproject.toml but not on disk: {gone}"


def test_the_migrations_ship_inside_controlplane() -> None:
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert mapping == {"controlplane.migrations": "migrations"}
    assert (ROOT / "migrations" / "alembic.ini").is_file() and (ROOT / "migrations" / "env.py").is_file()
