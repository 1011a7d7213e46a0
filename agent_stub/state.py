"""What the agent remembers across restarts: its identity and its cursor.

Both live as small JSON files in the state directory, each replaced atomically (write a
temporary file, fsync it, rename it over the old one, fsync the directory), so a crash at
any instant leaves either the old or the new content, never a torn file. Leftover
temporary files from such a crash are ignored and removed.

The cursor is only written after the desired state it names is durably applied (or
durably rejected, see `Failure`): resuming from it can never skip something the node did
not actually do.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

IDENTITY_FILE = "identity.json"
CURSOR_FILE = "cursor.json"
FORMAT = 1


@dataclass(frozen=True)
class Identity:
    node_id: str
    credential: str
    project: str
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    # The --address registered with it ("" for none).
    address: str = ""


@dataclass(frozen=True)
class Failure:
    """A NACKed desired state: the node parks instead of retrying it.

    A desired state with the same digest is ignored when its revision is not newer than
    `revision`, or when it comes from the same assignment (`assigned_revision`, same
    epoch): a bootstrap re-sends the current assignment at the head revision, which is
    not a reason to try the same bytes again.
    """

    digest: str
    revision: int
    error: str
    assigned_revision: int = 0
    epoch: str = ""

    def parks(self, digest: str, revision: int, assigned_revision: int, epoch: str) -> bool:
        if digest != self.digest:
            return False
        if revision <= self.revision:
            return True
        return bool(assigned_revision) and assigned_revision == self.assigned_revision and epoch == self.epoch


@dataclass(frozen=True)
class Cursor:
    # The revision to resume from: everything up to it is applied (or parked).
    revision: int = 0
    # The server history epoch `revision` belongs to.
    epoch: str = ""
    # The bundle `current` points at, as far as the last durable apply knows.
    applied_digest: str = ""
    applied_revision: int = 0
    # The traffic weight the apply command last accepted for the running bundle.
    applied_weight: int = 100
    # A router: the revision of the routing table its driver last applied (0: none).
    applied_routes: int = 0
    # The bundle before it, kept on disk for a quick manual rollback.
    previous_digest: str = ""
    failed: Failure | None = None
    # The node this cursor was received for; another node id starts from scratch.
    node_id: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["format"] = FORMAT
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Cursor:
        failed = data.get("failed")
        return cls(
            revision=int(data.get("revision", 0)),
            epoch=str(data.get("epoch", "")),
            applied_digest=str(data.get("applied_digest", "")),
            applied_revision=int(data.get("applied_revision", 0)),
            applied_weight=int(data.get("applied_weight", 100)),
            applied_routes=int(data.get("applied_routes", 0)),
            previous_digest=str(data.get("previous_digest", "")),
            node_id=str(data.get("node_id", "")),
            failed=Failure(
                digest=str(failed["digest"]),
                revision=int(failed["revision"]),
                error=str(failed.get("error", "")),
                assigned_revision=int(failed.get("assigned_revision", 0)),
                epoch=str(failed.get("epoch", "")),
            )
            if failed
            else None,
        )

    def advanced(self, revision: int, epoch: str) -> Cursor:
        """The cursor moved to `revision` of `epoch`; never backwards within one epoch."""
        if epoch == self.epoch and revision < self.revision:
            return self
        return replace(self, revision=revision, epoch=epoch)


class StateStore(Protocol):
    """Where identity and cursor are kept. Files by default; memory for simulators."""

    def load_identity(self) -> Identity | None: ...
    def save_identity(self, identity: Identity) -> None: ...
    def load_cursor(self) -> Cursor: ...
    def save_cursor(self, cursor: Cursor) -> None: ...


class MemoryStateStore:
    """Nothing survives the process: for in-process fleet simulations."""

    def __init__(self, identity: Identity | None = None, cursor: Cursor | None = None):
        self.identity = identity
        self.cursor = cursor or Cursor()
        self.cursor_writes = 0

    def load_identity(self) -> Identity | None:
        return self.identity

    def save_identity(self, identity: Identity) -> None:
        self.identity = identity

    def load_cursor(self) -> Cursor:
        return self.cursor

    def save_cursor(self, cursor: Cursor) -> None:
        self.cursor = cursor
        self.cursor_writes += 1


class CorruptState(RuntimeError):
    pass


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644, fsync: bool = True) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new content."""
    tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        fsync_dir(path.parent)


class FileStateStore:
    """`identity.json` (mode 0600: it holds the credential) and `cursor.json`."""

    def __init__(self, directory: Path, fsync: bool = True):
        self.directory = directory
        self.fsync = fsync
        directory.mkdir(parents=True, exist_ok=True)
        self.remove_leftovers()

    def remove_leftovers(self) -> list[Path]:
        """Temporary files of writes a crash interrupted (`atomic_write` of any of the
        state dir's JSON files: identity, cursor, pinned and retired keys); they never
        hold the truth."""
        removed = []
        for tmp in self.directory.glob("*.json.tmp-*"):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
        return removed

    def _read(self, name: str) -> dict[str, Any] | None:
        path = self.directory / name
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            # Atomic replacement means this is not a torn write but outside interference.
            raise CorruptState(f"{path} is not valid JSON ({e}); fix or remove it") from None
        if not isinstance(data, dict):
            raise CorruptState(f"{path} does not hold a JSON object")
        return data

    def _write(self, name: str, data: dict[str, Any], mode: int = 0o644) -> None:
        payload = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
        atomic_write(self.directory / name, payload, mode, self.fsync)

    def load_identity(self) -> Identity | None:
        data = self._read(IDENTITY_FILE)
        if data is None:
            return None
        try:
            return Identity(
                node_id=str(data["node_id"]),
                credential=str(data["credential"]),
                project=str(data["project"]),
                name=str(data["name"]),
                labels={str(k): str(v) for k, v in dict(data.get("labels", {})).items()},
                address=str(data.get("address", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptState(f"{self.directory / IDENTITY_FILE} lacks {e}") from None

    def save_identity(self, identity: Identity) -> None:
        self._write(IDENTITY_FILE, {**asdict(identity), "format": FORMAT}, mode=0o600)

    def load_cursor(self) -> Cursor:
        data = self._read(CURSOR_FILE)
        if data is None:
            return Cursor()
        try:
            return Cursor.from_json(data)
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptState(f"{self.directory / CURSOR_FILE} is malformed: {e!r}") from None

    def save_cursor(self, cursor: Cursor) -> None:
        self._write(CURSOR_FILE, cursor.to_json())
