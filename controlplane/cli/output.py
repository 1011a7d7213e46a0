"""How operator commands print: `-o table|json|yaml` on every command, a table with
headers by default (on a terminal or not, as kubectl does), `--json` kept as an alias of
`-o json`, and list commands that page (`--limit N`, `--all`) and say when there is more.

A table shows the columns of `VIEWS` for the answer's records (a list's items, or the
one record a get returns); an answer without a view shows its own plain fields, and one
with none (a configuration) its fields as YAML reads. JSON and
YAML show the whole answer, field names as in the proto.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
from google.protobuf.message import Message

FORMATS = ("table", "json", "yaml")
# Rows fetched per page when paging: the servers' largest page for most lists.
PAGE = 500
# Rows a list shows unless told otherwise: a screenful or two; --all for everything.
DEFAULT_LIMIT = 100

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=Message)

# The format of the command running now (set by OutputCommand before its callback).
_format = "table"


def _short(digest: str) -> str:
    """`sha256:` and 12 hex digits, as a column."""
    return digest[:19] if digest.startswith("sha256:") else digest


# Columns by record type: (header, dotted field path, how to show it).
Column = tuple[str, str, Callable[[Any], str] | None]
VIEWS: dict[str, list[Column]] = {
    "controlplane.node.v1.Node": [
        ("ID", "id", None),
        ("NAME", "name", None),
        ("STATUS", "status", None),
        ("HEALTH", "last_heartbeat.metrics.health", None),
        ("LABELS", "labels", None),
        ("DESIRED", "desired_digest", _short),
        ("APPLIED", "applied_digest", _short),
        ("LAST HEARTBEAT", "last_heartbeat_at", None),
    ],
    "controlplane.bundle.v1.Bundle": [
        ("DIGEST", "digest", None),
        ("VERSION", "version", None),
        ("STATE", "state", None),
        ("FILES", "file_count", None),
        ("SIZE", "size_bytes", None),
        ("RISK", "risk.level", None),
        ("CREATED", "created_at", None),
    ],
    "controlplane.bundle.v1.SigningKey": [
        ("KEY ID", "key_id", None),
        ("STATE", "state", None),
        ("SIGNING", "signing", None),
        ("ALGORITHM", "algorithm", None),
        ("CREATED", "created_at", None),
        ("RETIRED", "retired_at", None),
    ],
    "controlplane.rollout.v1.Rollout": [
        ("ID", "id", None),
        ("STATE", "state", None),
        ("STRATEGY", "strategy", None),
        ("BUNDLE", "bundle_digest", _short),
        ("SELECTOR", "selector", None),
        ("STEP", "progress.current_step", None),
        ("STEPS", "progress.steps", None),
        ("CREATED", "created_at", None),
        ("REASON", "reason", None),
    ],
    "controlplane.rollout.v1.RolloutNode": [
        ("NODE", "node_id", None),
        ("STEP", "step", None),
        ("STATE", "state", None),
        ("ROLE", "role", None),
        ("PREVIOUS", "previous_digest", _short),
        ("UPDATED", "updated_at", None),
        ("ERROR", "error", None),
    ],
    "controlplane.rollout.v1.FreezeWindow": [
        ("ID", "id", None),
        ("NAME", "name", None),
        ("STARTS", "starts_at", None),
        ("ENDS", "ends_at", None),
        ("REASON", "reason", None),
    ],
    "controlplane.rollout.v1.DriftEvent": [
        ("ID", "id", None),
        ("NODE", "node_id", None),
        ("DESIRED", "desired_digest", _short),
        ("APPLIED", "applied_digest", _short),
        ("DETECTED", "detected_at", None),
        ("RESOLVED", "resolved_at", None),
        ("RESOLUTION", "resolution", None),
        ("REMEDIATIONS", "remediations", None),
    ],
    "controlplane.project.v1.Project": [
        ("NAME", "name", None),
        ("NODES", "node_count", None),
        ("MIN APPROVALS", "policy.min_approvals", None),
        ("CREATED", "created_at", None),
    ],
    "controlplane.identity.v1.ApiKey": [
        ("ID", "id", None),
        ("NAME", "name", None),
        ("GRANTS", "grants", None),
        ("EXPIRES", "expires_at", None),
        ("REVOKED", "revoked_at", None),
        ("CREATED BY", "created_by", None),
    ],
    "controlplane.identity.v1.EnrollmentToken": [
        ("ID", "id", None),
        ("PROJECT", "project", None),
        ("USES LEFT", "uses_left", None),
        ("EXPIRES", "expires_at", None),
        ("REVOKED", "revoked_at", None),
    ],
    "controlplane.audit.v1.AuditEvent": [
        ("SEQ", "seq", None),
        ("TIME", "time", None),
        ("ACTOR", "actor", None),
        ("ACTION", "action", None),
        ("RESOURCE", "resource", None),
        ("PROJECT", "project", None),
    ],
}


# -- options -------------------------------------------------------------------------


def _set_format(ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
    global _format
    if value:
        _format = "json" if value is True else value
    return value


OUTPUT_OPTIONS = [
    click.Option(
        ["-o", "--output"],
        type=click.Choice(FORMATS),
        default="table",
        show_default=True,
        expose_value=False,
        is_eager=True,
        callback=_set_format,
        help="How to print the answer.",
    ),
    click.Option(
        ["--json"],
        is_flag=True,
        expose_value=False,
        callback=lambda ctx, p, v: _set_format(ctx, p, True) if v else None,
        help="The same as -o json.",
    ),
]


class OutputCommand(click.Command):
    """A command that takes -o/--output and --json (groups made with OutputGroup give
    these to every command and subgroup they make)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        taken = {opt for p in self.params for opt in getattr(p, "opts", ())}
        self.params += [o for o in OUTPUT_OPTIONS if not set(o.opts) & taken]


class OutputGroup(click.Group):
    command_class = OutputCommand
    group_class = type  # subgroups are OutputGroups too


def paged(command: F) -> F:
    """--limit and --all for a list command (passed as `limit` and `all_pages`)."""
    command = click.option(
        "--all", "all_pages", is_flag=True, help="Every record, however many pages it takes."
    )(command)
    return click.option(
        "--limit",
        type=click.IntRange(1),
        default=DEFAULT_LIMIT,
        show_default=True,
        help="Show at most this many records (a note says when there are more).",
    )(command)


def current_format() -> str:
    return _format


# -- calling and printing ------------------------------------------------------------


def fail(error: Any) -> click.ClickException:
    """A failed call as one line: `CODE: details` (the server's message, first line)."""
    details = (error.details() or "").strip().splitlines()
    text = details[0] if details else ""
    if len(text) > 300:
        text = text[:297] + "..."
    return click.ClickException(f"{error.code().name}: {text}" if text else error.code().name)


def fetch_pages(
    fetch: Callable[[str, int], M], items: str, limit: int, all_pages: bool, what: str = "records"
) -> M:
    """Call `fetch(page_token, page_size)` until `limit` records (or every one with
    `all_pages`); returns the first answer with every page's records in it. A note on
    stderr says when more remain, and how to see them."""
    merged: M | None = None
    token = ""
    while True:
        want = PAGE if all_pages else min(PAGE, limit - (len(getattr(merged, items)) if merged else 0))
        reply = fetch(token, want)
        if merged is None:
            merged = reply
        else:
            getattr(merged, items).extend(getattr(reply, items))
        token = getattr(reply, "next_page_token", "")
        have = len(getattr(merged, items))
        if not token or (not all_pages and have >= limit):
            break
    assert merged is not None
    if token:
        click.echo(f"(more {what} than the {have} shown: --limit N or --all)", err=True)
    if hasattr(merged, "next_page_token"):
        merged.next_page_token = token
    return merged


def show(message: Message, show_defaults: bool = False) -> None:
    """Print an answer in the chosen format."""
    if _format == "json":
        click.echo(_json(message, show_defaults))
    elif _format == "yaml":
        import yaml

        click.echo(
            yaml.safe_dump(_dict(message, show_defaults), sort_keys=False, allow_unicode=True).rstrip()
        )
    else:
        click.echo(table(message))


def show_json(message: Message, show_defaults: bool = False) -> None:
    click.echo(_json(message, show_defaults))


def _dict(message: Message, show_defaults: bool) -> dict[str, Any]:
    """The answer as JSON's data, field names as in the proto; a list with no records
    still names its (empty) list."""
    from google.protobuf import json_format

    data: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=show_defaults
    )
    for field in message.DESCRIPTOR.fields:
        if (
            field.is_repeated
            and field.message_type is not None
            and not field.message_type.GetOptions().map_entry
        ):
            data.setdefault(field.name, [])
    return data


def _json(message: Message, show_defaults: bool) -> str:
    import json

    return json.dumps(_dict(message, show_defaults), indent=2, ensure_ascii=False)


def table(message: Message) -> str:
    """The answer as a table: its records' columns, or its own fields."""
    records, descriptor = _records(message)
    if descriptor is None:
        columns = _plain_columns(message.DESCRIPTOR)
        if not columns:
            # Nothing that fits a cell (a configuration, say): its fields as YAML reads.
            import yaml

            return str(yaml.safe_dump(_dict(message, False), sort_keys=False, allow_unicode=True)).rstrip()
        return _render([h for h, _, _ in columns], [_plain_row(message)])
    columns = VIEWS.get(descriptor.full_name) or _plain_columns(descriptor)
    rows = [[_cell(_path(r, path), fmt) for _, path, fmt in columns] for r in records]
    text = _render([h for h, _, _ in columns], rows)
    # What the answer says besides its records: a secret shown once, `created`, ...
    extra = [
        f"{name}: {_cell(getattr(message, name), None, field)}"
        for name, field in _plain(message.DESCRIPTOR)
        if name != "next_page_token" and _is_set(message, field)
    ]
    return "\n".join([text, *extra])


def _is_set(message: Message, field: Any) -> bool:
    value = getattr(message, field.name)
    if field.message_type is not None and not field.is_repeated:
        return message.HasField(field.name)
    return bool(value)


def _records(message: Message) -> tuple[list[Message], Any]:
    """A list's items, or the one record of a get, with their type."""
    fields = message.DESCRIPTOR.fields
    for f in fields:
        if f.is_repeated and f.message_type is not None and not f.message_type.GetOptions().map_entry:
            return list(getattr(message, f.name)), f.message_type
    for f in fields:
        if f.message_type is not None and not f.is_repeated and f.message_type.full_name in VIEWS:
            return ([getattr(message, f.name)] if message.HasField(f.name) else []), f.message_type
    if message.DESCRIPTOR.full_name in VIEWS:
        return [message], message.DESCRIPTOR
    return [], None


def _plain(descriptor: Any) -> list[tuple[str, Any]]:
    """Fields that fit a cell: scalars, enums, maps, repeated scalars, times."""
    out = []
    for f in descriptor.fields:
        nested = f.message_type
        if nested is None or nested.full_name in _TIME_TYPES or nested.GetOptions().map_entry:
            out.append((f.name, f))
    return out


def _plain_columns(descriptor: Any) -> list[Column]:
    return [(name.upper().replace("_", " "), name, None) for name, _ in _plain(descriptor)]


def _plain_row(message: Message) -> list[str]:
    return [_cell(getattr(message, name), None, f) for name, f in _plain(message.DESCRIPTOR)]


_TIME_TYPES = ("google.protobuf.Timestamp", "google.protobuf.Duration")


def _path(message: Message, path: str) -> Any:
    value: Any = message
    for part in path.split("."):
        if isinstance(value, Message):
            field = value.DESCRIPTOR.fields_by_name.get(part)
            if field is None:
                return ""
            if field.message_type is not None and not field.is_repeated and not value.HasField(part):
                return ""
            if field.enum_type is not None and not field.is_repeated:
                return _enum(field, getattr(value, part))
            value = getattr(value, part)
        else:
            return ""
    return value


def _enum(field: Any, number: int) -> str:
    enum = field.enum_type
    assert enum is not None
    name = enum.values_by_number[number].name if number in enum.values_by_number else str(number)
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
    name = name.removeprefix(prefix)
    return "" if name == "UNSPECIFIED" else name.lower()


def _cell(value: Any, fmt: Callable[[Any], str] | None, field: Any = None) -> str:
    if field is not None and field.enum_type is not None and not field.is_repeated:
        return _enum(field, value)
    if fmt is not None:
        return fmt(value)
    if isinstance(value, Message):
        return _message_cell(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, bytes):
        return value.hex()[:16]
    if hasattr(value, "items"):  # a map
        return ",".join(f"{k}={v}" for k, v in sorted(value.items()))
    if isinstance(value, Iterable) and not isinstance(value, str):
        return ",".join(_cell(v, None) for v in value)
    return str(value)


def _message_cell(value: Any) -> str:
    """A message in one cell: times, durations and grants; others are left out."""
    name = value.DESCRIPTOR.full_name
    if name == "google.protobuf.Timestamp":
        if not value.seconds and not value.nanos:
            return ""
        return datetime.fromtimestamp(value.seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if name == "google.protobuf.Duration":
        return f"{value.seconds + value.nanos / 1e9:g}s"
    if name == "controlplane.identity.v1.Grant":
        return f"{value.project}={_enum(value.DESCRIPTOR.fields_by_name['role'], value.role)}"
    return ""


def _render(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = [headers, *rows]
    return "\n".join(
        "   ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )
