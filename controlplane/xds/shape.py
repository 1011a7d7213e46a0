"""Checking a YAML/JSON value against a protobuf message type, naming the field at fault.

protobuf's own JSON parser stops at the first problem and often without saying where
("Failed to parse filters field: ..."). This walk reports each problem with its field
path (`filter_chains[0].filters[0].typed_config.stat_prefix: expected a string, got
1`), so an operator can find it in the file; the parse that follows it then only
converts what is already known to fit.
"""

from __future__ import annotations

import contextlib
import difflib
import math
from typing import Any, cast

from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from controlplane.xds import catalog

# Past this depth the document is refused (protobuf itself parses 100 levels).
MAX_DEPTH = 64
# Errors reported per document: the first ones are enough to act on.
MAX_ERRORS = 20
_SHOWN = 60
_WELL_KNOWN = "google.protobuf."
# The range of each protobuf integer type (what a value must fit).
INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_FLOATS = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)


def show(value: Any) -> str:
    """A short, safe rendering of a value for an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "…"


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class Checker:
    """Collects the problems of one document; `errors` holds `path: problem` lines."""

    def __init__(self, max_errors: int = MAX_ERRORS):
        self.errors: list[str] = []
        self._max = max_errors

    @property
    def full(self) -> bool:
        return len(self.errors) >= self._max

    def error(self, path: str, problem: str) -> None:
        if not self.full:
            self.errors.append(f"{path or '(top)'}: {problem}")

    def message(self, value: Any, desc: Descriptor, path: str, depth: int = 0) -> None:
        if depth > MAX_DEPTH:
            self.error(path, f"nested more than {MAX_DEPTH} levels deep")
            return
        name = desc.full_name
        if name == "google.protobuf.Any":
            self._any(value, path, depth)
            return
        if name.startswith(_WELL_KNOWN):
            self._well_known(value, desc, path)
            return
        if not isinstance(value, dict):
            self.error(path, f"expected an object ({desc.name}), got {show(value)}")
            return
        oneofs: dict[str, str] = {}
        for key, item in value.items():
            if self.full:
                return
            if not isinstance(key, str):
                self.error(path, f"field names are strings, got {show(key)}")
                continue
            fd = desc.fields_by_name.get(key) or desc.fields_by_camelcase_name.get(key)
            if fd is None:
                self.error(join(path, key), f"no such field in {desc.name}{_suggest(key, desc)}")
                continue
            where = join(path, fd.name)
            if item is None:
                continue  # null: the field is unset
            oneof = fd.containing_oneof
            if oneof is not None and not oneof.name.startswith("_"):
                if oneof.name in oneofs:
                    self.error(
                        where, f"'{oneofs[oneof.name]}' is already set: at most one of {oneof.name} can be"
                    )
                    continue
                oneofs[oneof.name] = fd.name
            self._field(item, fd, where, depth + 1)

    def _field(self, value: Any, fd: FieldDescriptor, path: str, depth: int) -> None:
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            if not isinstance(value, dict):
                self.error(path, f"expected a map (an object), got {show(value)}")
                return
            value_fd = fd.message_type.fields_by_name["value"]
            for k, v in value.items():
                self._single(v, value_fd, f"{path}[{show(k)}]", depth)
            return
        if fd.is_repeated:
            if not isinstance(value, list):
                self.error(path, f"expected a list, got {show(value)}")
                return
            for i, item in enumerate(value):
                if item is None:
                    self.error(f"{path}[{i}]", "a list element cannot be null")
                else:
                    self._single(item, fd, f"{path}[{i}]", depth)
            return
        self._single(value, fd, path, depth)

    def _single(self, value: Any, fd: FieldDescriptor, path: str, depth: int) -> None:
        if self.full:
            return
        if fd.message_type is not None:
            self.message(value, fd.message_type, path, depth)
        elif fd.enum_type is not None:
            self._enum(value, fd.enum_type, path)
        else:
            self._scalar(value, fd, path)

    def _scalar(self, value: Any, fd: FieldDescriptor, path: str) -> None:
        t = fd.type
        if t == FieldDescriptor.TYPE_STRING:
            if not isinstance(value, str):
                self.error(path, f"expected a string, got {show(value)}")
        elif t == FieldDescriptor.TYPE_BYTES:
            if not isinstance(value, str):
                self.error(path, f"expected base64 text, got {show(value)}")
        elif t == FieldDescriptor.TYPE_BOOL:
            if not isinstance(value, bool):
                self.error(path, f"expected true or false, got {show(value)}")
        elif t in _FLOATS:
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                self.error(path, f"expected a number, got {show(value)}")
            elif isinstance(value, str) and value not in ("NaN", "Infinity", "-Infinity"):
                try:
                    float(value)
                except ValueError:
                    self.error(path, f"expected a number, got {show(value)}")
        else:
            self._integer(value, t, path)

    def _integer(self, value: Any, t: int, path: str) -> None:
        number: int | None = None
        if isinstance(value, bool):
            pass
        elif isinstance(value, int):
            number = value
        elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
            number = int(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = int(value)
        if number is None:
            self.error(path, f"expected an integer, got {show(value)}")
            return
        low, high = INT_RANGES.get(t, (-(2**63), 2**64 - 1))
        if not low <= number <= high:
            self.error(path, f"{number} is out of range ({low}..{high})")

    def _enum(self, value: Any, enum: EnumDescriptor, path: str) -> None:
        if isinstance(value, str):
            if value not in enum.values_by_name:
                names = ", ".join(list(enum.values_by_name)[:12])
                self.error(path, f"{show(value)} is not a value of {enum.name} ({names})")
        elif isinstance(value, bool) or not isinstance(value, int):
            self.error(path, f"expected one of {enum.name}'s names, got {show(value)}")

    def _any(self, value: Any, path: str, depth: int) -> None:
        if not isinstance(value, dict):
            self.error(path, f"expected an object with '@type', got {show(value)}")
            return
        url = value.get("@type")
        if not isinstance(url, str) or not url:
            self.error(path, "an Any needs '@type' naming its message type")
            return
        desc = resolve(url)
        if desc is None:
            self.error(join(path, "@type"), f"unknown type {show(url)} (not in Envoy's v3 API)")
            return
        rest = {k: v for k, v in value.items() if k != "@type"}
        if desc.full_name.startswith(_WELL_KNOWN) and desc.full_name != "google.protobuf.Any":
            self.message(rest.get("value"), desc, join(path, "value"), depth + 1)
        else:
            self.message(rest, desc, path, depth + 1)

    def _well_known(self, value: Any, desc: Descriptor, path: str) -> None:
        cls = message_factory.GetMessageClass(desc)
        try:
            json_format.ParseDict(value, cls())
        except (json_format.ParseError, ValueError, TypeError, AttributeError) as e:
            self.error(path, f"not a valid {desc.name}: {_first_line(str(e))}")


def resolve(type_url: str) -> Descriptor | None:
    """The descriptor a type URL names (`type.googleapis.com/<full name>`), or None."""
    if "/" not in type_url:
        return None
    cls = catalog.message_class(type_url.rsplit("/", 1)[-1])
    if cls is None:
        return None
    return cast(Descriptor, cls.DESCRIPTOR)


def _suggest(key: str, desc: Descriptor) -> str:
    close = difflib.get_close_matches(key, list(desc.fields_by_name), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "invalid"
    return line if len(line) <= 200 else line[:200] + "…"


def check(value: Any, desc: Descriptor, path: str = "", max_errors: int = MAX_ERRORS) -> list[str]:
    """The problems of `value` as a `desc` message, each `path: problem`."""
    checker = Checker(max_errors)
    checker.message(value, desc, path)
    return checker.errors
