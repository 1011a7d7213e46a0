"""`controlplane keys ...` (API keys) and `controlplane enrollment ...` (enrollment tokens
and node identities)."""

from __future__ import annotations

import re
from typing import Any

import click
from google.protobuf.duration_pb2 import Duration

from controlplane.api.identity.v1 import identity_pb2 as pb
from controlplane.api.identity.v1 import identity_pb2_grpc
from controlplane.cli.client import call, call_pages, channel, project_option, server_option
from controlplane.cli.output import OutputGroup, paged

_ROLES = {"reader": pb.ROLE_READER, "operator": pb.ROLE_OPERATOR, "admin": pb.ROLE_ADMIN}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _stub(server: str) -> identity_pb2_grpc.IdentityServiceStub:
    return identity_pb2_grpc.IdentityServiceStub(channel(server))


def parse_duration(text: str) -> Duration:
    """`90d`, `12h`, `30m`, `45s` or plain seconds."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text)
    if match is None:
        raise click.BadParameter(f"{text!r} is not a duration like 90d, 12h, 30m or 3600")
    return Duration(seconds=int(match.group(1)) * _UNITS[match.group(2) or "s"])


def parse_grant(text: str) -> pb.Grant:
    project, sep, role = text.partition("=")
    if not sep or role not in _ROLES or not project:
        raise click.BadParameter(
            f"{text!r}: expected PROJECT=ROLE (ROLE reader, operator or admin; PROJECT * for all)"
        )
    return pb.Grant(project=project, role=_ROLES[role])


@click.group(cls=OutputGroup)
def keys() -> None:
    """API keys of operators and services."""


@keys.command("create")
@server_option
@click.option("--name", required=True, help="Who or what the key is for.")
@click.option(
    "--grant",
    "grants",
    multiple=True,
    required=True,
    help="PROJECT=ROLE, ROLE one of reader, operator, admin; '*=admin' for every project (repeatable).",
)
@click.option("--ttl", default="", help="Lifetime, e.g. 30d or 12h (default 90d).")
def key_create(server: str, name: str, grants: tuple[str, ...], ttl: str) -> None:
    """Create a key; its secret is printed once and never again."""
    request = pb.CreateApiKeyRequest(name=name, grants=[parse_grant(g) for g in grants])
    if ttl:
        request.ttl.CopyFrom(parse_duration(ttl))
    stub = _stub(server)
    call(lambda: stub.CreateApiKey(request))
    click.echo("the secret above is shown only once: store it now", err=True)


@keys.command("list")
@server_option
@click.option("--project", default="", help="Keys with a grant in this project (default: every key).")
@click.option("--include-revoked", is_flag=True)
@paged
def key_list(server: str, project: str, include_revoked: bool, limit: int, all_pages: bool) -> None:
    stub = _stub(server)

    def page(token: str, size: int) -> Any:
        request = pb.ListApiKeysRequest(
            project=project, include_revoked=include_revoked, page_size=size, page_token=token
        )
        return stub.ListApiKeys(request)

    call_pages(page, "keys", limit, all_pages, "keys")


@keys.command("revoke")
@server_option
@click.argument("key_id")
def key_revoke(server: str, key_id: str) -> None:
    """Revoke a key by its id (the part after cpk_)."""
    stub = _stub(server)
    call(lambda: stub.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=key_id)))


@click.group(cls=OutputGroup)
def enrollment() -> None:
    """Enrollment tokens nodes join a project with, and node identities."""


@enrollment.command("create")
@server_option
@project_option
@click.option("--ttl", default="", help="Lifetime, e.g. 7d (default: never expires).")
@click.option("--max-uses", type=click.IntRange(0), default=0, help="Registrations allowed (0: unlimited).")
def token_create(server: str, project: str, ttl: str, max_uses: int) -> None:
    """Create an enrollment token; its secret is printed once."""
    request = pb.CreateEnrollmentTokenRequest(project=project, max_uses=max_uses)
    if ttl:
        request.ttl.CopyFrom(parse_duration(ttl))
    stub = _stub(server)
    call(lambda: stub.CreateEnrollmentToken(request))


@enrollment.command("list")
@server_option
@project_option
def token_list(server: str, project: str) -> None:
    stub = _stub(server)
    call(lambda: stub.ListEnrollmentTokens(pb.ListEnrollmentTokensRequest(project=project)))


@enrollment.command("revoke")
@server_option
@project_option
@click.argument("token_id")
def token_revoke(server: str, project: str, token_id: str) -> None:
    stub = _stub(server)
    call(
        lambda: stub.RevokeEnrollmentToken(
            pb.RevokeEnrollmentTokenRequest(project=project, token_id=token_id)
        )
    )


@enrollment.command("revoke-node")
@server_option
@click.argument("node_id")
@click.option(
    "--allow-reenroll",
    is_flag=True,
    help="Let the next registration under the node's name take it (an agent that lost its state).",
)
def node_revoke(server: str, node_id: str, allow_reenroll: bool) -> None:
    """End a node's identity: its credential, tokens and open streams. Its name stays
    barred from enrolling again unless --allow-reenroll."""
    stub = _stub(server)
    call(lambda: stub.RevokeNode(pb.RevokeNodeRequest(node_id=node_id, allow_reenroll=allow_reenroll)))
