"""File-by-file differences between two bundles, with unified diffs of text files."""

from __future__ import annotations

import difflib
import enum
from collections.abc import Mapping
from dataclasses import dataclass

from controlplane.domain.bundles.archive.manifest import Entry, Manifest

# Files larger than this are compared by hash only: a diff of them would not be read.
MAX_TEXT_BYTES = 1024 * 1024
# All unified diffs of one answer together; well under the 4 MiB message limit.
MAX_DIFF_BYTES = 2 * 1024 * 1024
MAX_CONTEXT = 50


class ChangeKind(enum.StrEnum):
    ADDED = "added"
    REMOVED = "removed"
    MODIFIED = "modified"


@dataclass(frozen=True)
class FileChange:
    path: str
    kind: ChangeKind
    old_size: int = 0
    new_size: int = 0
    unified_diff: str = ""
    binary: bool = False
    diff_truncated: bool = False


@dataclass(frozen=True)
class Planned:
    path: str
    kind: ChangeKind
    old: Entry | None
    new: Entry | None


def plan(old: Manifest, new: Manifest) -> list[Planned]:
    before, after = old.by_path(), new.by_path()
    out = []
    for path in sorted(before.keys() | after.keys()):
        a, b = before.get(path), after.get(path)
        if a == b:
            continue
        kind = ChangeKind.ADDED if a is None else ChangeKind.REMOVED if b is None else ChangeKind.MODIFIED
        out.append(Planned(path, kind, a, b))
    return out


def wanted(changes: list[Planned]) -> tuple[set[str], set[str]]:
    """Which files' bytes a diff needs from the old and the new archive."""
    old = {
        c.path for c in changes if c.old is not None and not c.old.is_link and c.old.size <= MAX_TEXT_BYTES
    }
    new = {
        c.path for c in changes if c.new is not None and not c.new.is_link and c.new.size <= MAX_TEXT_BYTES
    }
    return old, new


def _lines(entry: Entry | None, data: bytes | None) -> list[str] | None:
    """The file's lines, or None when it is binary or too large to diff."""
    if entry is None:
        return []
    if entry.is_link:
        return [f"-> {entry.link}\n"]
    if data is None:
        return None
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        return None


def render(
    changes: list[Planned],
    old_bytes: Mapping[str, bytes | None],
    new_bytes: Mapping[str, bytes | None],
    context: int = 3,
) -> tuple[list[FileChange], bool]:
    """The changes with their diffs; True when some diffs were left out for size."""
    budget = MAX_DIFF_BYTES
    truncated = False
    out = []
    for change in changes:
        a = _lines(change.old, old_bytes.get(change.path))
        b = _lines(change.new, new_bytes.get(change.path))
        old_size = change.old.size if change.old is not None else 0
        new_size = change.new.size if change.new is not None else 0
        if a is None or b is None:
            out.append(FileChange(change.path, change.kind, old_size, new_size, binary=True))
            continue
        text = "".join(
            difflib.unified_diff(
                a, b, f"a/{change.path}", f"b/{change.path}", n=min(max(context, 0), MAX_CONTEXT)
            )
        )
        cut = False
        if len(text.encode()) > budget:
            text, cut, truncated = text.encode()[:budget].decode(errors="ignore"), True, True
        budget -= len(text.encode())
        out.append(FileChange(change.path, change.kind, old_size, new_size, text, diff_truncated=cut))
    return out, truncated
