"""Bundle directories in the state dir and the `current` symlink.

    <state>/bundles/<hex>/         one unpacked bundle per digest
    <state>/bundles/<hex>.tmp-*/   an extraction in progress (removed on error / at start)
    <state>/downloads/             archives being downloaded (removed once unpacked)
    <state>/current -> bundles/<hex>

`current` only ever changes by `os.replace` of a fully prepared symlink, so a reader (or
the proxy) sees the old bundle or the new one, never a missing or half-written one. It is
never deleted but in one case: the node's first bundle, swapped in, and then refused by
the proxy (`unswap`): the node had nothing before it, and has nothing again.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

from agent_stub.state import fsync_dir

_HEX = re.compile(r"^[0-9a-f]{64}$")
DIGEST_PREFIX = "sha256:"


def digest_hex(digest: str) -> str:
    """The hex part of a `sha256:<hex>` digest; ValueError for anything else."""
    if not digest.startswith(DIGEST_PREFIX) or not _HEX.match(digest[len(DIGEST_PREFIX) :]):
        raise ValueError(f"{digest[:80]!r} is not a digest of the form sha256:<64 hex digits>")
    return digest[len(DIGEST_PREFIX) :]


class BundleStore:
    def __init__(self, root: Path, fsync: bool = True):
        self.root = root
        self.bundles = root / "bundles"
        self.downloads = root / "downloads"
        self.current = root / "current"
        self.fsync = fsync
        self.bundles.mkdir(parents=True, exist_ok=True)
        self.downloads.mkdir(parents=True, exist_ok=True)

    def path_for(self, digest: str) -> Path:
        return self.bundles / digest_hex(digest)

    def active_digest(self) -> str:
        """The digest `current` points at, if it points at a bundle that is there."""
        try:
            target = os.readlink(self.current)
        except OSError:
            return ""
        name = Path(target).name
        if not _HEX.match(name) or not (self.bundles / name).is_dir():
            return ""
        return DIGEST_PREFIX + name

    def active_dir(self) -> Path | None:
        digest = self.active_digest()
        return self.path_for(digest) if digest else None

    def new_download(self) -> Path:
        fd, name = tempfile.mkstemp(dir=self.downloads, prefix="bundle-", suffix=".tar.zst")
        os.close(fd)
        return Path(name)

    def new_staging(self, digest: str) -> Path:
        return Path(tempfile.mkdtemp(dir=self.bundles, prefix=f"{digest_hex(digest)}.tmp-"))

    def commit(self, staging: Path, digest: str) -> Path:
        """Move a complete extraction to its final name."""
        final = self.path_for(digest)
        if final.exists():
            if digest == self.active_digest():
                raise RuntimeError(f"refusing to replace the active bundle {digest}")
            # An older extraction of the same bytes (a rollback target): start fresh,
            # an apply hook may have changed files in it.
            self.discard(final)
        os.rename(staging, final)
        if self.fsync:
            fsync_dir(self.bundles)
        return final

    def swap(self, digest: str) -> None:
        """Point `current` at `digest`'s directory, atomically."""
        final = self.path_for(digest)
        if not final.is_dir():
            raise FileNotFoundError(f"bundle directory {final} is missing")
        tmp = self.root / f".current.tmp-{secrets.token_hex(4)}"
        os.symlink(os.path.relpath(final, self.root), tmp)
        try:
            os.replace(tmp, self.current)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        if self.fsync:
            fsync_dir(self.root)

    def unswap(self) -> None:
        """Remove `current` (a first bundle the proxy would not run)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.current)
        if self.fsync:
            fsync_dir(self.root)

    def discard(self, path: Path) -> None:
        """Remove a bundle or staging directory (never the active one)."""
        active = self.active_dir()
        if active is not None and path.resolve() == active.resolve():
            raise RuntimeError(f"refusing to remove the active bundle {path}")
        # Rename first so a crash mid-delete leaves a `.tmp-` name the next start cleans.
        doomed = path.with_name(f"{path.name}.tmp-gc{secrets.token_hex(3)}")
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            return
        if doomed.is_dir() and not doomed.is_symlink():
            shutil.rmtree(doomed, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                doomed.unlink()

    def gc(self, keep: set[str]) -> list[str]:
        """Remove every bundle directory but the active one and `keep`, plus leftovers of
        interrupted extractions, downloads and symlink swaps. Returns what was removed."""
        keep_names = {digest_hex(d) for d in keep if d}
        active = self.active_digest()
        if active:
            keep_names.add(digest_hex(active))
        removed = []
        for entry in self.bundles.iterdir():
            if entry.name in keep_names:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()
            removed.append(entry.name)
        for entry in self.downloads.iterdir():
            with contextlib.suppress(OSError):
                entry.unlink()
        for entry in self.root.glob(".current.tmp-*"):
            with contextlib.suppress(OSError):
                entry.unlink()
        return removed
