"""Receive an untrusted set of files into a scratch directory, refusing anything hostile.

Both ways into the pipeline end here: files sent one by one (`CreateBundle`) and the
members of an uploaded tar stream. Every entry is checked before a byte is written:
relative names only, no `..`, no control characters, nothing under the reserved
`.bundle/` directory, no duplicates, no path running through a file or a symlink,
symlinks that stay inside the tree, hardlinks only to a regular file already received
(stored as a copy), and the limits on entries, file size and total size. A final walk
checks every symlink on disk.
"""

from __future__ import annotations

import os
import posixpath
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from controlplane.domain.bundles.archive.limits import ArchiveLimits, InvalidArchive

# Where the pipeline puts the manifest and the SBOM inside every archive.
META_DIR = ".bundle"
_COPY_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class TreeInfo:
    files: int
    total_bytes: int


class FileSink:
    """The bytes of one file on their way to disk; refuses more than were announced or
    allowed."""

    def __init__(self, tree: TreeBuilder, name: str, handle: IO[bytes], expected: int | None):
        self._tree = tree
        self._name = name
        self._handle = handle
        self._expected = expected
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._expected is not None and self.size > self._expected:
            raise InvalidArchive(f"file {self._name!r}: more bytes than the {self._expected} announced")
        limits = self._tree.limits
        if self.size > limits.max_file_bytes:
            raise InvalidArchive(
                f"file {self._name!r}: larger than the limit of {limits.max_file_bytes} bytes"
            )
        self._tree.total_bytes += len(data)
        self._tree.check_wanted()
        if self._tree.total_bytes > limits.max_total_bytes:
            raise InvalidArchive(
                f"file {self._name[:80]!r}: the files exceed the limit of {limits.max_total_bytes} "
                "bytes in total"
            )
        self._handle.write(data)

    def abort(self) -> None:
        """Stop writing without the size check (the request failed)."""
        self._handle.close()

    def close(self) -> None:
        self._handle.close()
        if self._expected is not None and self.size != self._expected:
            raise InvalidArchive(
                f"file {self._name!r}: {self.size} bytes received, {self._expected} announced"
            )


class TreeBuilder:
    def __init__(self, root: Path, limits: ArchiveLimits):
        self.root = root
        self.limits = limits
        root.mkdir(parents=True, exist_ok=True)
        # Normalized name -> "file", "dir" or "symlink".
        self.kinds: dict[str, str] = {}
        self.entries = 0
        self.files = 0
        self.total_bytes = 0
        self._abandoned = False

    def abandon(self) -> None:
        """The request went away: the next entry or chunk (from another thread) stops."""
        self._abandoned = True

    def check_wanted(self) -> None:
        if self._abandoned:
            raise InvalidArchive("the upload was abandoned")

    # -- names -----------------------------------------------------------------------

    def check_name(self, raw: str, what: str = "path") -> str:
        """The normalized name of an entry, or InvalidArchive saying what is wrong with it."""
        if not raw or "\x00" in raw:
            raise InvalidArchive(f"{what} {raw[:80]!r} is empty or holds NUL")
        if len(raw.encode("utf-8", "surrogateescape")) > self.limits.max_name_bytes:
            raise InvalidArchive(f"{what} {raw[:80]!r}... is longer than {self.limits.max_name_bytes} bytes")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in raw):
            raise InvalidArchive(f"{what} {raw[:80]!r} holds control characters")
        if raw.startswith("/"):
            raise InvalidArchive(f"{what} {raw!r} is refused: absolute path")
        if ".." in raw.split("/"):
            raise InvalidArchive(f"{what} {raw!r} is refused: '..' climbs out of the bundle")
        name = posixpath.normpath(raw)
        if name in (".", ""):
            raise InvalidArchive(f"{what} {raw!r} names the bundle root")
        if name == META_DIR or name.startswith(META_DIR + "/"):
            raise InvalidArchive(f"{what} {raw!r} is refused: {META_DIR}/ is reserved for the manifest")
        return name

    def _claim(self, raw: str, kind: str) -> tuple[str, Path]:
        """Check a new entry's name and place; returns its name and its path on disk."""
        self.check_wanted()
        self.entries += 1
        if self.entries > self.limits.max_members:
            raise InvalidArchive(f"more than {self.limits.max_members} members")
        name = self.check_name(raw)
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            existing = self.kinds.get(parent)
            if existing is not None and existing != "dir":
                raise InvalidArchive(
                    f"member {raw!r} is refused: its path goes through {existing} {parent!r}"
                )
        if name in self.kinds:
            if kind == "dir" and self.kinds[name] == "dir":
                return name, self.root / name
            raise InvalidArchive(f"member {raw!r} appears twice")
        for i in range(1, len(parts)):
            self.kinds.setdefault("/".join(parts[:i]), "dir")
        self.kinds[name] = kind
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return name, path

    # -- entries ---------------------------------------------------------------------

    def add_dir(self, raw: str) -> None:
        _, path = self._claim(raw, "dir")
        path.mkdir(exist_ok=True)

    def open_file(self, raw: str, size: int | None = None, executable: bool = False) -> FileSink:
        if size is not None and size < 0:
            raise InvalidArchive(f"file {raw[:80]!r}: negative size")
        if size is not None and size > self.limits.max_file_bytes:
            raise InvalidArchive(
                f"file {raw[:80]!r}: larger than the limit of {self.limits.max_file_bytes} bytes"
            )
        if size is not None and self.total_bytes + size > self.limits.max_total_bytes:
            raise InvalidArchive(
                f"file {raw[:80]!r} ({size} bytes): the files exceed the limit of "
                f"{self.limits.max_total_bytes} bytes in total"
            )
        name, path = self._claim(raw, "file")
        self.files += 1
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755 if executable else 0o644)
        return FileSink(self, name, os.fdopen(fd, "wb"), size)

    def add_file(self, raw: str, source: IO[bytes], size: int, executable: bool = False) -> None:
        sink = self.open_file(raw, size, executable)
        try:
            while sink.size < size:
                chunk = source.read(min(_COPY_CHUNK, size - sink.size))
                if not chunk:
                    break
                sink.write(chunk)
        finally:
            sink.close()

    def check_symlink(self, raw: str, target: str) -> None:
        """InvalidArchive unless a symlink `raw` -> `target` stays inside the tree (as far
        as names tell; `finish` resolves chains of links on disk)."""
        self._check_link_target(raw, self.check_name(raw), target)

    def add_symlink(self, raw: str, target: str) -> None:
        self.check_symlink(raw, target)
        _, path = self._claim(raw, "symlink")
        os.symlink(target, path)

    def check_hardlink(self, raw: str, target: str) -> str:
        """The name of the file a hardlink `raw` copies; InvalidArchive if it leaves the tree."""
        self.check_name(raw)
        if not target or target.startswith("/") or ".." in target.split("/"):
            raise InvalidArchive(f"member {raw!r} is refused: hardlink to {target[:80]!r} leaves the bundle")
        return posixpath.normpath(target)

    def add_hardlink(self, raw: str, target: str) -> None:
        """Stored as a copy of the regular file it names (already received)."""
        source = self.check_hardlink(raw, target)
        if self.kinds.get(source) != "file":
            raise InvalidArchive(
                f"member {raw!r} is refused: hardlink target {target[:80]!r} is not a regular file "
                "earlier in the bundle"
            )
        src_path = self.root / source
        executable = bool(src_path.stat().st_mode & 0o111)
        size = src_path.stat().st_size
        with src_path.open("rb") as src:
            self.add_file(raw, src, size, executable)

    def _check_link_target(self, raw: str, name: str, target: str) -> None:
        if not target or "\x00" in target:
            raise InvalidArchive(f"member {raw!r} is refused: empty symlink target")
        if len(target.encode("utf-8", "surrogateescape")) > self.limits.max_name_bytes:
            raise InvalidArchive(f"member {raw!r} is refused: symlink target too long")
        if target.startswith("/"):
            raise InvalidArchive(f"member {raw!r} is refused: symlink to absolute path {target!r}")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
        if resolved == ".." or resolved.startswith("../"):
            raise InvalidArchive(f"member {raw!r} is refused: symlink {target!r} points outside the bundle")
        if resolved == META_DIR or resolved.startswith(META_DIR + "/"):
            raise InvalidArchive(f"member {raw!r} is refused: symlink into the reserved {META_DIR}/")

    # -- the end ---------------------------------------------------------------------

    def finish(self) -> TreeInfo:
        if self.files == 0:
            raise InvalidArchive("the bundle holds no files")
        root = os.path.realpath(self.root)
        for name, kind in self.kinds.items():
            if kind != "symlink":
                continue
            target = os.path.realpath(self.root / name)
            if os.path.commonpath([target, root]) != root:
                raise InvalidArchive(f"member {name!r} is refused: symlink resolves outside the bundle")
        return TreeInfo(self.files, self.total_bytes)

    def discard(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
