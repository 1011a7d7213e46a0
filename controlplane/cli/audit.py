"""`controlplane audit list|verify|export`"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, BinaryIO, TypeVar

import click
import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from controlplane.api.audit.v1 import audit_pb2 as pb
from controlplane.api.audit.v1 import audit_pb2_grpc
from controlplane.cli.client import call_pages, channel, print_message, server_option, unary
from controlplane.cli.output import OutputGroup, paged
from controlplane.cli.servers import Reconnect, parse_deadline, reconnect_option

F = TypeVar("F", bound=Callable[..., Any])

_filters = [
    click.option("--project", default="", help="Entries of this project (default: every project)."),
    click.option("--actor", default="", help="e.g. operator:<key id>, node:<node id>, system:offline-sweep"),
    click.option("--action", default="", help="e.g. node.register, desired.assign, apikey.revoke"),
    click.option("--resource", default="", help="e.g. node/<id>, apikey/<id>"),
    click.option("--since", "start", type=click.DateTime(), default=None, help="At or after (UTC)."),
    click.option("--until", "end", type=click.DateTime(), default=None, help="Before (UTC)."),
]


def with_filters(command: F) -> F:
    for option in reversed(_filters):
        command = option(command)
    return command


def _timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value.replace(tzinfo=UTC) if value.tzinfo is None else value)
    return ts


def _filter(
    actor: str, action: str, resource: str, start: datetime | None, end: datetime | None
) -> pb.AuditFilter:
    return pb.AuditFilter(
        actor=actor, action=action, resource=resource, start_time=_timestamp(start), end_time=_timestamp(end)
    )


def _stub(server: str) -> audit_pb2_grpc.AuditServiceStub:
    return audit_pb2_grpc.AuditServiceStub(channel(server))


@click.group(cls=OutputGroup)
def audit() -> None:
    """The tamper-evident audit log."""


@audit.command("list")
@server_option
@with_filters
@click.option("--oldest-first", is_flag=True, help="Default: newest first.")
@paged
def audit_list(
    server: str,
    project: str,
    actor: str,
    action: str,
    resource: str,
    start: datetime | None,
    end: datetime | None,
    oldest_first: bool,
    limit: int,
    all_pages: bool,
) -> None:
    stub = _stub(server)

    def page(token: str, size: int) -> Any:
        request = pb.ListAuditEventsRequest(
            project=project,
            filter=_filter(actor, action, resource, start, end),
            page_size=size,
            page_token=token,
            newest_first=not oldest_first,
        )
        return stub.ListAuditEvents(request)

    call_pages(page, "events", limit, all_pages, "entries")


def _checkpoint(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[int, str]:
    if not value:
        return 0, ""
    seq, sep, mac = value.partition(":")
    if not sep or not seq.isdigit():
        raise click.BadParameter("expected SEQ:MAC, as an earlier verify printed it")
    return int(seq), mac


@audit.command("verify")
@server_option
@click.option(
    "--checkpoint",
    default="",
    callback=_checkpoint,
    metavar="SEQ:MAC",
    help="A head an earlier verify printed; the chain must still hold it.",
)
def audit_verify(server: str, checkpoint: tuple[int, str]) -> None:
    """Recompute the chain; exits 1 naming the first bad entry if it does not verify.
    Prints the verified head as a checkpoint to keep outside the control plane (on
    stderr; the answer itself goes to stdout)."""
    request = pb.VerifyAuditChainRequest(checkpoint_seq=checkpoint[0], checkpoint_mac=checkpoint[1])
    reply = unary(lambda: _stub(server).VerifyAuditChain(request))
    print_message(reply)
    if not reply.ok:
        raise click.ClickException(f"the audit chain is broken: {reply.reason}")
    click.echo(f"checkpoint: {reply.head_seq}:{reply.head_mac}", err=True)


@audit.command("export")
@server_option
@with_filters
@click.option("--output", "-o", type=click.File("wb"), default="-", help="File (default: stdout).")
@reconnect_option
def audit_export(
    server: str,
    project: str,
    actor: str,
    action: str,
    resource: str,
    start: datetime | None,
    end: datetime | None,
    output: BinaryIO,
    reconnect_deadline: str,
) -> None:
    """Write matching entries as JSON lines, oldest first, with their MACs. A broken
    export (a restart, a failover) starts again and writes only entries after the last
    one written; exit code 5 if no server answers for --reconnect-deadline."""
    request = pb.ExportAuditEventsRequest(
        project=project, filter=_filter(actor, action, resource, start, end)
    )
    servers = channel(server)
    reconnect = Reconnect(servers, parse_deadline(reconnect_deadline))
    written = 0  # the chain's seq of the last entry written
    while True:
        try:
            for reply in audit_pb2_grpc.AuditServiceStub(servers).ExportAuditEvents(request):
                reconnect.progressed()
                for line in reply.jsonl.splitlines(keepends=True):
                    seq = int(json.loads(line)["seq"])
                    if seq > written:
                        output.write(line)
                        written = seq
            break
        except grpc.RpcError as e:
            reconnect.failed(e)
    output.flush()
