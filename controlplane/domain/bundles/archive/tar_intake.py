"""Read an uploaded tar stream (plain, gzip or zstd) into a `TreeBuilder`.

Nothing is extracted by tarfile itself: each member is checked (the builder's rules plus
the standard library's `data` filter as a second opinion) and its bytes copied through
the builder, which enforces the limits as they arrive.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import zlib
from pathlib import Path
from typing import IO

import zstandard

from controlplane.domain.bundles.archive.limits import (
    CappedTarInfo,
    CountingReader,
    InvalidArchive,
    stream_limit,
)
from controlplane.domain.bundles.archive.tree import TreeBuilder

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"
# A destination that does not exist: the filter only needs a root to resolve against.
_ROOT = "/nonexistent-bundle-root"


def _decompressed(raw: IO[bytes]) -> IO[bytes]:
    head = raw.read(4)
    raw.seek(0)
    if head.startswith(_ZSTD_MAGIC):
        # All frames, as the zstd CLI does: a multi-frame archive is one tar stream.
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    if head.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def read_tar(archive: Path, tree: TreeBuilder) -> None:
    """Feed every member of `archive` to `tree`. InvalidArchive names the member and why."""
    if archive.stat().st_size == 0:
        raise InvalidArchive("the upload is empty")
    name = ""
    try:
        with archive.open("rb") as raw, _decompressed(raw) as plain:
            counted = io.BufferedReader(CountingReader(plain, stream_limit(tree.limits)), 64 * 1024)
            with tarfile.open(fileobj=counted, mode="r|", tarinfo=CappedTarInfo, errorlevel=2) as tar:
                for member in tar:
                    name = member.name
                    _add(tar, member, tree)
                    name = ""
    except InvalidArchive:
        raise
    except tarfile.FilterError as e:
        raise InvalidArchive(f"member {name[:80]!r} is refused: {e}") from None
    except ValueError as e:
        # A name or link target the file system cannot take (an embedded NUL): the
        # member's fault, not ours.
        raise InvalidArchive(f"member {name[:80]!r} is refused: {e}") from None
    except (tarfile.TarError, zstandard.ZstdError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        where = f" at member {name[:80]!r}" if name else ""
        raise InvalidArchive(f"not a valid tar archive (plain, gzip or zstd){where}: {e}") from None


def _add(tar: tarfile.TarFile, member: tarfile.TarInfo, tree: TreeBuilder) -> None:
    raw = member.name
    # The archive's own root entry ("./") carries nothing.
    if member.isdir() and raw.rstrip("/") in (".", ""):
        return
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        kind = "device file" if member.ischr() or member.isblk() else "fifo" if member.isfifo() else "special"
        raise InvalidArchive(f"member {raw!r} is refused: {kind}, not a regular file, directory or link")
    # Our own rules first (clearer messages, and a NUL the standard filter's path
    # functions would choke on), then the standard filter as a second line.
    tree.check_name(raw, "member")
    if member.issym():
        tree.check_symlink(raw, member.linkname)
    elif member.islnk():
        tree.check_hardlink(raw, member.linkname)
    tarfile.data_filter(member, _ROOT)
    if member.isdir():
        tree.add_dir(raw)
    elif member.issym():
        tree.add_symlink(raw, member.linkname)
    elif member.islnk():
        tree.add_hardlink(raw, member.linkname)
    else:
        source = tar.extractfile(member)
        if source is None:
            raise InvalidArchive(f"member {raw!r} has no data")
        tree.add_file(raw, source, member.size, executable=bool(member.mode & 0o111))
