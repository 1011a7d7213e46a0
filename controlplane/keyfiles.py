"""Secrets kept as files readable only by their owner: generated on first start in the
embedded mode, supplied by configuration in production."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 0600, atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_or_create_hex(path: Path, nbytes: int = 32) -> tuple[bytes, bool]:
    """The hex-encoded secret in `path`, generating it if the file does not exist.
    Returns the secret and whether it was created."""
    if path.exists():
        return bytes.fromhex(path.read_text().strip()), False
    key = secrets.token_bytes(nbytes)
    write_private(path, key.hex().encode() + b"\n")
    return key, True
