"""The built-in configuration parsers: KDL (ckdl), JSON, YAML (PyYAML, safe loader).

Each parse reads one file of a received tree and answers the parsed document or an
error naming the file and line (and column where the parser tells it). Parsing
untrusted text must not take the server down: files above a size cap are refused, and
deep nesting becomes an error instead of a crash.

KDL comes in two versions and Zentinel accepts both: KDL 2.0 (bare-word values,
`#true`, `#null`) and KDL 1.0 (quoted strings, `true`, `r"raw"`). A file whose first
node is the version marker `/- kdl-version 1` (or `2`) is read as that version only;
any other is read as 2.0 and, failing that, as 1.0. Documents come back as `KdlNode`s,
our own plain model, so nothing past this module knows the parser library.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ckdl  # type: ignore[import-untyped]
import yaml

# libyaml's safe loader when PyYAML was built with it: the same documents, ten times faster.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# Configuration files are text a person edits; 8 MiB is far beyond any real one and
# keeps a pure-Python parse within seconds.
MAX_PARSE_BYTES = 8 * 1024 * 1024
# Real configurations nest a handful of levels; what reads the structure recurses.
MAX_KDL_DEPTH = 100
# Finding the line of a KDL error re-parses prefixes (binary search, about log2(lines)
# parses), once every version has failed: only in files up to _LOCATE_BYTES, and at most
# _LOCATE_BUDGET bytes re-parsed per file whatever its versions, so a hostile file costs
# a bounded ~0.5 s more; past that the message comes without a line.
_LOCATE_BYTES = 256 * 1024
_LOCATE_BUDGET = 4 * 1024 * 1024


class ConfigFormat(enum.StrEnum):
    KDL = "kdl"
    JSON = "json"
    YAML = "yaml"
    # KDL syntax plus Zentinel's structure (see kdl_config.zentinel_errors).
    ZENTINEL = "zentinel"


EXTENSIONS = {
    ConfigFormat.KDL: ("*.kdl",),
    ConfigFormat.JSON: ("*.json",),
    ConfigFormat.YAML: ("*.yaml", "*.yml"),
    ConfigFormat.ZENTINEL: ("*.kdl",),
}


@dataclass(frozen=True)
class Parsed:
    path: str
    document: Any = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass(frozen=True)
class Tagged:
    """A KDL value with a type annotation, `(duration)"5s"`."""

    tag: str
    value: Any

    def __repr__(self) -> str:
        return f"({self.tag}){self.value!r}"


def plain(value: Any) -> Any:
    """The value without its type annotation."""
    return value.value if isinstance(value, Tagged) else value


@dataclass
class KdlNode:
    name: str
    args: list[Any] = field(default_factory=list)
    props: dict[str, Any] = field(default_factory=dict)
    nodes: list[KdlNode] = field(default_factory=list)


@dataclass
class KdlDocument:
    nodes: list[KdlNode]
    # The KDL version it parsed as: 2 or 1.
    version: int


class KdlError(ValueError):
    """Not a KDL document: `line` (when found) and what is wrong, per version tried."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


_KDL_MARKER = re.compile(r"\A\ufeff?\s*/-\s*kdl-version\s+([0-9]+)")
# Messages meaning "the input ended too early": every prefix of a document says so.
_KDL_EOF = ("Unexpected end of data",)


def _value(raw: Any) -> Any:
    if isinstance(raw, ckdl.Value):
        return Tagged(str(raw.type_annotation), raw.value)
    return raw


def _convert(doc: Any) -> list[KdlNode]:
    """ckdl's tree as KdlNodes, without recursion; RecursionError past MAX_KDL_DEPTH."""
    root: list[KdlNode] = []
    stack: list[tuple[list[Any], list[KdlNode], int]] = [(list(doc.nodes), root, 1)]
    while stack:
        sources, into, depth = stack.pop()
        if depth > MAX_KDL_DEPTH:
            raise RecursionError
        for src in sources:
            node = KdlNode(
                str(src.name),
                [_value(a) for a in src.args],
                {str(k): _value(v) for k, v in src.properties.items()},
            )
            into.append(node)
            if src.children:
                stack.append((list(src.children), node.nodes, depth + 1))
    return root


@dataclass(frozen=True)
class _Failure:
    message: str


class _Budget:
    """Bytes the line search may still re-parse."""

    def __init__(self, total: int):
        self.left = total


def _attempt(text: str, version: int) -> Any:
    """ckdl's document, or the message of why it is not one. Any exception of the
    library counts as "not this version" (a lone surrogate escape raises
    UnicodeDecodeError from inside ckdl, not ParseError); RecursionError and
    MemoryError are left to the caller."""
    try:
        return ckdl.parse(text, version=version)
    except ckdl.ParseError as e:
        return _Failure(str(e))
    except UnicodeError:
        return _Failure("a string escape is not a Unicode character (a lone surrogate?)")
    except (RecursionError, MemoryError):
        raise
    except Exception as e:
        return _Failure(f"the KDL parser failed ({type(e).__name__}: {e})")


def _error_line(text: str, version: int, message: str, budget: _Budget) -> int | None:
    """The line where parsing as `version` first fails with `message`: a binary search
    over prefixes, within `budget` (None when it would run out)."""
    lines = text.splitlines(keepends=True)
    if message.startswith(_KDL_EOF):
        return len(lines) or 1
    if len(text) > _LOCATE_BYTES or not lines:
        return None
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))

    def fails_here(k: int) -> bool:
        budget.left -= starts[k]
        failure = _attempt(text[: starts[k]], version)
        return isinstance(failure, _Failure) and failure.message == message

    # The whole text fails with `message` (that is how we got here): search below it.
    lo, hi = 1, len(lines)
    while lo < hi:
        mid = (lo + hi) // 2
        if budget.left < starts[mid]:
            return None
        if fails_here(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def parse_kdl(text: str) -> KdlDocument:
    """A KDL 2.0 or 1.0 document (see the module docstring); KdlError otherwise."""
    marked = _KDL_MARKER.match(text)
    if marked and marked.group(1) not in ("1", "2"):
        raise KdlError(f"kdl-version {marked.group(1)} is not a KDL version this server reads (1, 2)", 1)
    versions = (int(marked.group(1)),) if marked else (2, 1)
    failures: list[tuple[int, str]] = []
    for version in versions:
        doc = _attempt(text, version)
        if not isinstance(doc, _Failure):
            return KdlDocument(_convert(doc), version)
        failures.append((version, doc.message))
    # Every version failed: only now look for the lines, within one budget.
    budget = _Budget(_LOCATE_BUDGET)
    located = [(_error_line(text, v, m, budget), f"{m} (as KDL {v}.0)") for v, m in failures]
    (line, message), *others = located
    for other_line, other in others:
        message += f"; {f'line {other_line}: ' if other_line else ''}{other}"
    raise KdlError(message, line)


def parse(root: Path, path: str, fmt: ConfigFormat) -> Parsed:
    """Parse `root/path` as `fmt` (ZENTINEL parses as KDL)."""
    full = root / path
    try:
        size = full.stat().st_size
        if size > MAX_PARSE_BYTES:
            return Parsed(path, error=f"{path}: {size} bytes, over the {MAX_PARSE_BYTES}-byte parse limit")
        text = full.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        return Parsed(path, error=f"{path}: not UTF-8 text (byte {e.start})")
    except OSError as e:
        return Parsed(path, error=f"{path}: cannot read: {e.strerror}")
    try:
        if fmt in (ConfigFormat.KDL, ConfigFormat.ZENTINEL):
            return Parsed(path, parse_kdl(text))
        if fmt is ConfigFormat.JSON:
            return Parsed(path, json.loads(text))
        return Parsed(path, list(yaml.load_all(text, Loader=_YAML_LOADER)))
    except RecursionError:
        return Parsed(path, error=f"{path}: nested too deeply to parse")
    except KdlError as e:
        return Parsed(path, error=f"{path}:{e.line}: {e}" if e.line else f"{path}: {e}")
    except json.JSONDecodeError as e:
        return Parsed(path, error=f"{path}:{e.lineno}:{e.colno}: {e.msg}")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        return Parsed(path, error=f"{path}{where}: {problem}")
