"""Extract a `.tar.zst` bundle without trusting it.

The server inspects every upload, but the agent checks again on its own: the bytes it
unpacks are the ones it verified against the digest, and a compromised or buggy server
must not be able to write outside the bundle directory or fill the disk.

Every member passes, in order:
- our own checks, counted as the stream is read (nothing is buffered whole): member count,
  size of one file, total size, name length, absolute names, `..` components, duplicates,
  paths running through a symlink or a file, link targets, file types;
- the standard library's `data` extraction filter, which resolves links on disk.
The decompressed tar stream itself is counted too, so a bomb is stopped at the limit, and
metadata headers (pax, GNU long names) are size-capped before tarfile reads them.
"""

from __future__ import annotations

import io
import os
import posixpath
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import zstandard

# pax and GNU long-name headers are read into memory whole by tarfile: cap them.
MAX_META_HEADER = 1024 * 1024
_META_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


@dataclass(frozen=True)
class UnpackLimits:
    # Real proxy configurations are hundreds of files; ten thousand leaves room for large
    # generated route tables while refusing an inode-exhaustion archive.
    max_members: int = 10_000
    # A bundle is configuration, not content: a gigabyte unpacked is already generous.
    max_total_bytes: int = 1024 * 1024 * 1024
    max_file_bytes: int = 256 * 1024 * 1024
    # Well under PATH_MAX, so path resolution never gives up half way.
    max_name_bytes: int = 1024


@dataclass(frozen=True)
class UnpackResult:
    members: int
    files: int
    total_bytes: int


class UnpackError(Exception):
    """Extraction failed; the message names the member and the reason."""


class UnsafeArchive(UnpackError):
    """The archive is malformed or hostile."""


class UnpackCancelled(UnpackError):
    pass


class _Counting(io.RawIOBase):
    """Counts decompressed bytes and refuses to go past the limit."""

    def __init__(self, inner: IO[bytes], limit: int):
        self._inner = inner
        self._limit = limit
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(buffer))
        self.count += len(data)
        if self.count > self._limit:
            raise UnsafeArchive(f"archive decompresses past {self._limit} bytes (decompression bomb?)")
        buffer[: len(data)] = data
        return len(data)


class _CappedTarInfo(tarfile.TarInfo):
    """Refuses oversized metadata headers before tarfile reads them into memory."""

    def _proc_member(self, tar: tarfile.TarFile) -> Any:
        if self.type in _META_TYPES and self.size > MAX_META_HEADER:
            raise UnsafeArchive(f"a metadata header of {self.size} bytes precedes member {self.name!r}")
        return tarfile.TarInfo._proc_member(self, tar)  # type: ignore[attr-defined]


class _Checker:
    def __init__(self, limits: UnpackLimits):
        self.limits = limits
        self.members = 0
        self.files = 0
        self.total = 0
        # Normalized name -> kind ("file", "dir", "symlink", "hardlink").
        self.seen: dict[str, str] = {}

    def check(self, member: tarfile.TarInfo) -> str | None:
        """The normalized name to extract, or None for the archive's root entry."""
        limits = self.limits
        self.members += 1
        if self.members > limits.max_members:
            raise UnsafeArchive(f"archive has more than {limits.max_members} members")
        raw = member.name
        name = self._name(raw)
        if name is None:
            if not member.isdir():
                raise UnsafeArchive(f"member {raw!r}: only a directory may name the bundle root")
            return None
        for i in range(len(parts := name.split("/")) - 1):
            parent = "/".join(parts[: i + 1])
            kind = self.seen.get(parent)
            if kind is not None and kind != "dir":
                raise UnsafeArchive(f"member {raw!r}: its path goes through {kind} {parent!r}")
        if name in self.seen:
            raise UnsafeArchive(f"member {raw!r}: appears more than once in the archive")
        kind = self._kind(member, raw, name)
        self.seen[name] = kind
        return name

    def _name(self, raw: str) -> str | None:
        if not raw or "\x00" in raw:
            raise UnsafeArchive(f"member {raw[:80]!r}: empty name or NUL byte")
        if len(raw.encode("utf-8", "surrogateescape")) > self.limits.max_name_bytes:
            raise UnsafeArchive(
                f"member {raw[:80]!r}...: name longer than {self.limits.max_name_bytes} bytes"
            )
        if raw.startswith("/"):
            raise UnsafeArchive(f"member {raw!r}: absolute path")
        if ".." in raw.split("/"):
            raise UnsafeArchive(f"member {raw!r}: '..' in path")
        name = posixpath.normpath(raw)
        return None if name == "." else name

    def _kind(self, member: tarfile.TarInfo, raw: str, name: str) -> str:
        limits = self.limits
        if member.isreg():
            if member.size > limits.max_file_bytes:
                raise UnsafeArchive(
                    f"member {raw!r}: {member.size} bytes, over the {limits.max_file_bytes}-byte limit "
                    "for one file"
                )
            self.total += member.size
            if self.total > limits.max_total_bytes:
                raise UnsafeArchive(
                    f"member {raw!r}: files add up to more than {limits.max_total_bytes} bytes "
                    "(decompression bomb?)"
                )
            self.files += 1
            return "file"
        if member.isdir():
            return "dir"
        if member.issym() or member.islnk():
            link = member.linkname
            what = "symlink" if member.issym() else "hardlink"
            if (
                not link
                or "\x00" in link
                or len(link.encode("utf-8", "surrogateescape")) > limits.max_name_bytes
            ):
                raise UnsafeArchive(f"member {raw!r}: {what} target is empty, too long or holds NUL")
            if link.startswith("/"):
                raise UnsafeArchive(f"member {raw!r}: {what} to absolute path {link!r}")
            if member.issym():
                resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), link))
                if resolved == ".." or resolved.startswith("../"):
                    raise UnsafeArchive(f"member {raw!r}: symlink {link!r} points outside the bundle")
                return "symlink"
            target = posixpath.normpath(link)
            if self.seen.get(target) != "file":
                raise UnsafeArchive(
                    f"member {raw!r}: hardlink target {link!r} is not a regular file earlier in the bundle"
                )
            return "hardlink"
        if member.ischr() or member.isblk():
            raise UnsafeArchive(f"member {raw!r}: device file")
        if member.isfifo():
            raise UnsafeArchive(f"member {raw!r}: named pipe (fifo)")
        raise UnsafeArchive(f"member {raw!r}: unsupported member type {member.type!r}")


def unpack(
    archive: Path,
    dest: Path,
    limits: UnpackLimits | None = None,
    *,
    cancelled: threading.Event | None = None,
    fsync: bool = True,
) -> UnpackResult:
    """Extract `archive` into the existing, empty directory `dest`.

    On error `dest` may hold part of the archive; the caller discards it.
    """
    limits = limits or UnpackLimits()
    checker = _Checker(limits)
    # Headers and padding besides file data: allow a few KiB per member.
    stream_limit = limits.max_total_bytes + (limits.max_members + 16) * 4096
    root = str(dest.resolve())
    name = ""
    try:
        with (
            archive.open("rb") as raw,
            # All frames, as the zstd CLI does: a multi-frame archive is one tar stream.
            zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True) as plain,
        ):
            counted = io.BufferedReader(_Counting(plain, stream_limit), 64 * 1024)
            with tarfile.open(fileobj=counted, mode="r|", tarinfo=_CappedTarInfo, errorlevel=2) as tar:
                for member in tar:
                    if cancelled is not None and cancelled.is_set():
                        raise UnpackCancelled("extraction cancelled")
                    name = member.name
                    if checker.check(member) is None:
                        continue
                    try:
                        tarfile.data_filter(member, root)
                    except tarfile.FilterError as e:
                        raise UnsafeArchive(f"member {name!r}: refused by the data filter: {e}") from None
                    tar.extract(member, root, filter="data")
                    name = ""
    except UnpackError:
        raise
    except tarfile.FilterError as e:
        raise UnsafeArchive(f"member {name!r}: refused by the data filter: {e}") from None
    except (tarfile.TarError, zstandard.ZstdError, EOFError) as e:
        where = f" at member {name!r}" if name else ""
        raise UnsafeArchive(f"not a valid .tar.zst archive{where}: {e}") from None
    except OSError as e:
        if name:
            raise UnpackError(f"member {name!r}: cannot extract: {e}") from None
        raise UnpackError(f"cannot read the archive: {e}") from None
    if checker.files == 0:
        raise UnsafeArchive("archive holds no files")
    _verify_tree(dest)
    if fsync:
        _fsync_tree(dest)
    return UnpackResult(members=checker.members, files=checker.files, total_bytes=checker.total)


def _verify_tree(dest: Path) -> None:
    """Last line of defence: every symlink on disk resolves inside `dest`."""
    root = os.path.realpath(dest)
    for dirpath, dirnames, filenames in os.walk(dest):
        for entry in (*dirnames, *filenames):
            path = os.path.join(dirpath, entry)
            if os.path.islink(path):
                target = os.path.realpath(path)
                if os.path.commonpath([target, root]) != root:
                    rel = os.path.relpath(path, dest)
                    raise UnsafeArchive(f"member {rel!r}: symlink resolves outside the bundle ({target})")


def _fsync_tree(dest: Path) -> None:
    """Make the unpacked files durable before anything points at them."""
    for dirpath, _dirnames, filenames in os.walk(dest):
        for entry in filenames:
            path = os.path.join(dirpath, entry)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
