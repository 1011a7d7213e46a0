"""Secrets kept as files readable only by their owner: generated on first start in the
embedded mode, supplied by configuration in production."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path


def write_private(path: Path, data: bytes) -> None:
    """Write a secret to `path` with mode 0600, atomically and durably (`write_atomic`):
    after a crash `path` holds the old key or all of the new one, never an empty or
    partial key — a lost audit or signing key cannot be made again."""
    write_atomic(path, data, 0o600)


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` (mode `mode`), atomically and durably.

    The bytes go to a new temporary file beside `path`, made with O_EXCL and mode 0600
    (so a leftover or planted file can neither widen its mode nor redirect it), widened
    to `mode` if asked, fsynced, renamed over `path`, and then the directory is fsynced.
    A failed write leaves no temporary file behind; those a crash left (they may hold a
    key) are removed first."""
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode != 0o600:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` survive a crash (the entry lives in the directory)."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_or_create_hex(path: Path, nbytes: int = 32) -> tuple[bytes, bool]:
    """The hex-encoded secret in `path`, generating it if the file does not exist.
    Returns the secret and whether it was created."""
    if path.exists():
        return bytes.fromhex(path.read_text().strip()), False
    key = secrets.token_bytes(nbytes)
    write_private(path, key.hex().encode() + b"\n")
    return key, True
