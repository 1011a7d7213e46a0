"""The built-in configuration parsers: KDL (kdl-py), JSON, YAML (PyYAML, safe loader).

Each parse reads one file of a received tree and answers the parsed document or an
error naming the file, line and column. Parsing untrusted text must not take the
server down: files above a size cap are refused, and deep nesting (which the parsers
handle by recursion) becomes an error instead of a crash.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kdl.errors import ParseError as KdlParseError
from kdl.parsefuncs import parse as parse_kdl

# libyaml's safe loader when PyYAML was built with it: the same documents, ten times faster.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# Configuration files are text a person edits; 8 MiB is far beyond any real one and
# keeps a pure-Python parse within seconds.
MAX_PARSE_BYTES = 8 * 1024 * 1024


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


_KDL_POSITION = re.compile(r"^(\d+):(\d+) parse error: (.*)$", re.DOTALL)


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
    except KdlParseError as e:
        match = _KDL_POSITION.match(str(e).strip())
        if match:
            return Parsed(path, error=f"{path}:{match.group(1)}:{match.group(2)}: {match.group(3)}")
        return Parsed(path, error=f"{path}: {e}")
    except json.JSONDecodeError as e:
        return Parsed(path, error=f"{path}:{e.lineno}:{e.colno}: {e.msg}")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        return Parsed(path, error=f"{path}{where}: {problem}")
