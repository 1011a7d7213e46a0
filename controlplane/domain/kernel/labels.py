"""Labels, selectors and the watch keys derived from them.

A label is `key=value` on a node. A selector is a conjunction of label matches
(`env=prod,region=eu`) or `*`. Watch keys name rows of the desired-state log:
`node:<id>` for per-node assignments, `sel:<project>:<selector>` for fleet-wide ones and
`meta:<id>` for a node's own routing data (its labels).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from controlplane.domain.kernel.errors import InvalidArgument

# Kubernetes-style syntax: operators already know it, and it keeps keys safe to embed in
# watch keys and metric labels.
_KEY = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$")
_VALUE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_NODE_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?$")
# Every label multiplies the selectors a node can match; 32 is far above real use.
MAX_LABELS = 32
ALL = "*"


def validate_labels(labels: Mapping[str, str], field: str = "labels") -> dict[str, str]:
    """Return a plain dict of `labels`, or raise naming the first bad entry."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"at most {MAX_LABELS} labels, got {len(labels)}", field=field)
    for key, value in labels.items():
        if not _KEY.match(key):
            raise InvalidArgument(
                f"label key {key!r} must be 1-63 characters of letters, digits, '.', '_', '-', '/' "
                "and start and end with a letter or digit",
                field=f"{field}[{key!r}]" if key else field,
            )
        if not _VALUE.match(value):
            raise InvalidArgument(
                f"label value {value!r} must be at most 63 characters of letters, digits, '.', '_', '-' "
                "and start and end with a letter or digit",
                field=f"{field}[{key!r}]",
            )
    return dict(labels)


def parse_label_pairs(pairs: Iterable[str], field: str = "labels") -> dict[str, str]:
    """Parse `key=value` strings (CLI and agent flags) into validated labels."""
    labels: dict[str, str] = {}
    for pair in pairs:
        for item in filter(None, (p.strip() for p in pair.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise InvalidArgument(f"{item!r} is not of the form key=value", field=field)
            if key in labels:
                raise InvalidArgument(f"label {key!r} given twice", field=field)
            labels[key] = value
    return validate_labels(labels, field)


def validate_name(name: str, field: str) -> str:
    """A project name: a lower-case DNS label."""
    if not _NAME.match(name):
        raise InvalidArgument(
            f"{name!r} must be 1-63 lower-case letters, digits or '-', starting and ending "
            "with a letter or digit",
            field=field,
        )
    return name


def validate_node_name(name: str, field: str = "name") -> str:
    if not _NODE_NAME.match(name):
        raise InvalidArgument(
            f"{name!r} must be 1-128 letters, digits, '.', '_' or '-', starting and ending "
            "with a letter or digit",
            field=field,
        )
    return name


@dataclass(frozen=True, slots=True)
class Selector:
    """A conjunction of label matches; no terms means every node."""

    terms: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, text: str, field: str = "selector") -> Selector:
        text = text.strip()
        if text == ALL:
            return cls(())
        if not text:
            raise InvalidArgument("must not be empty; use '*' for every node", field=field)
        labels = parse_label_pairs([text], field)
        return cls(tuple(sorted(labels.items())))

    def canonical(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.terms) if self.terms else ALL

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.terms)


def node_key(node_id: str) -> str:
    return f"node:{node_id}"


def route_key(node_id: str) -> str:
    """The key of a router node's routing table (domain/routing/)."""
    return f"route:{node_id}"


def meta_key(node_id: str) -> str:
    return f"meta:{node_id}"


def selector_key(project: str, selector: Selector) -> str:
    return f"sel:{project}:{selector.canonical()}"


def parse_selector_key(key: str) -> tuple[str, Selector] | None:
    """`sel:<project>:<selector>` → (project, selector); None for other keys."""
    if not key.startswith("sel:"):
        return None
    project, _, text = key[4:].partition(":")
    return project, Selector.parse(text)


def source_name(key: str) -> str:
    """How a watch key is shown to nodes and operators: `node:<id>` or the selector."""
    parsed = key.split(":", 2)
    return parsed[2] if parsed[0] == "sel" else key
