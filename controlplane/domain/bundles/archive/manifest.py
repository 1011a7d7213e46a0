"""The canonical `manifest.json` every bundle carries at `.bundle/manifest.json`.

    {"files":[{"mode":"0644","path":"conf/main.kdl","sha256":"<hex>","size":123},
              {"link":"main.kdl","path":"current.kdl"}],
     "format":"controlplane.bundle/v1"}

Keys sorted, no whitespace, UTF-8, one trailing newline; entries sorted by the UTF-8
bytes of their path. Regular files carry size, sha256 and mode (0644, or 0755 when
executable); symbolic links carry their target. Directories are implied. The same
files always give the same bytes, and its sha256 (`manifest_digest`) names the content
whatever the compression.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane.domain.bundles.archive.limits import InvalidArchive
from controlplane.domain.bundles.archive.tree import META_DIR

FORMAT = "controlplane.bundle/v1"
MANIFEST_PATH = f"{META_DIR}/manifest.json"
SBOM_PATH = f"{META_DIR}/sbom.cdx.json"
_READ = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Entry:
    path: str
    size: int = 0
    sha256: str = ""
    executable: bool = False
    # Set for a symbolic link.
    link: str = ""

    @property
    def is_link(self) -> bool:
        return bool(self.link)

    @property
    def mode(self) -> int:
        return 0o755 if self.executable else 0o644

    def as_json(self) -> dict[str, Any]:
        if self.link:
            return {"path": self.path, "link": self.link}
        return {"path": self.path, "size": self.size, "sha256": self.sha256, "mode": f"{self.mode:04o}"}


@dataclass(frozen=True, slots=True)
class Manifest:
    entries: tuple[Entry, ...]

    @property
    def files(self) -> tuple[Entry, ...]:
        return tuple(e for e in self.entries if not e.is_link)

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries)

    def by_path(self) -> dict[str, Entry]:
        return {e.path: e for e in self.entries}

    def to_bytes(self) -> bytes:
        body = {"format": FORMAT, "files": [e.as_json() for e in self.entries]}
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"

    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.to_bytes()).hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            body = json.loads(data)
            if body.get("format") != FORMAT:
                raise InvalidArchive(f"manifest format {body.get('format')!r} is not {FORMAT}")
            entries = tuple(_entry(item) for item in body["files"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InvalidArchive(f"manifest.json is malformed: {e}") from None
        return cls(entries)

    def to_json(self) -> list[list[Any]]:
        """Compact form kept in the database: [path, size, sha256, executable, link]."""
        return [[e.path, e.size, e.sha256, e.executable, e.link] for e in self.entries]

    @classmethod
    def from_json(cls, rows: list[list[Any]]) -> Manifest:
        return cls(tuple(Entry(str(p), int(s), str(h), bool(x), str(link)) for p, s, h, x, link in rows))


def _entry(item: dict[str, Any]) -> Entry:
    if "link" in item:
        return Entry(path=str(item["path"]), link=str(item["link"]))
    mode = int(str(item["mode"]), 8)
    return Entry(str(item["path"]), int(item["size"]), str(item["sha256"]), bool(mode & 0o111))


def sort_key(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def _walk(root: Path) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in (*filenames, *(d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))):
            yield name if rel == "." else f"{rel}/{name}".replace(os.sep, "/")


def scan(root: Path) -> Manifest:
    """Hash every file under `root` (received by a TreeBuilder) into a manifest."""
    entries = []
    for path in sorted(_walk(root), key=sort_key):
        full = root / path
        if full.is_symlink():
            entries.append(Entry(path=path, link=os.readlink(full)))
            continue
        digest = hashlib.sha256()
        size = 0
        with full.open("rb") as f:
            while chunk := f.read(_READ):
                digest.update(chunk)
                size += len(chunk)
        entries.append(Entry(path, size, digest.hexdigest(), bool(full.stat().st_mode & 0o111)))
    return Manifest(tuple(entries))
