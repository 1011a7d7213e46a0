"""`controlplane notify`: notification channels and their messages.

A channel's secret is write-only: give it with `--secret-file` or `--secret-env` (never
on the command line, where shell history and `ps` would keep it); no command prints it.
"""

from __future__ import annotations

import os
from pathlib import Path

import click
from google.protobuf.duration_pb2 import Duration

from controlplane.api.notification.v1 import notification_pb2 as pb
from controlplane.api.notification.v1 import notification_pb2_grpc
from controlplane.cli.client import call, call_pages, channel, project_option, server_option
from controlplane.cli.output import OutputGroup, paged
from controlplane.cli.rollouts import parse_duration

KINDS = {
    "webhook": pb.CHANNEL_KIND_WEBHOOK,
    "slack": pb.CHANNEL_KIND_SLACK,
    "pagerduty": pb.CHANNEL_KIND_PAGERDUTY,
}
STATES = {
    "pending": pb.MESSAGE_STATE_PENDING,
    "delivered": pb.MESSAGE_STATE_DELIVERED,
    "dead": pb.MESSAGE_STATE_DEAD,
}


def _stub(server: str) -> notification_pb2_grpc.NotificationServiceStub:
    return notification_pb2_grpc.NotificationServiceStub(channel(server))


def _secret(path: str | None, env: str | None) -> str:
    if path and env:
        raise click.UsageError("give at most one of --secret-file and --secret-env")
    if path:
        return Path(path).read_text().strip()
    if env:
        value = os.environ.get(env)
        if value is None:
            raise click.BadParameter(f"${env} is not set", param_hint="--secret-env")
        return value.strip()
    return ""


def _window(text: str | None) -> Duration | None:
    if text is None:
        return None
    d = Duration()
    d.FromTimedelta(parse_duration(text))
    return d


_secret_options = (
    click.option("--secret-file", type=click.Path(exists=True, dir_okay=False), default=None,
                 help="A file holding the HMAC key (or the PagerDuty routing key)."),
    click.option("--secret-env", default=None, help="An environment variable holding it."),
)  # fmt: skip


@click.group(cls=OutputGroup)
def notify() -> None:
    """Notifications: channels (webhook, Slack, PagerDuty) and delivered messages."""


@notify.group("channels")
def channels() -> None:
    """Where a project's events go (admins create, change and delete them)."""


@channels.command("create")
@server_option
@project_option
@click.argument("name")
@click.option("--kind", type=click.Choice(list(KINDS)), default="webhook", show_default=True)
@click.option("--url", required=True, help="http(s) URL of the receiver.")
@_secret_options[0]
@_secret_options[1]
@click.option("--event", "events", multiple=True, help="An event kind to route here (repeat); none: all.")
@click.option("--rate", type=click.IntRange(1, 600), default=None, help="New messages a minute at most.")
@click.option("--group-window", default=None, help="How long a new message waits for more events (10s).")
@click.option("--max-attempts", type=click.IntRange(1, 30), default=None)
@click.option("--disabled", is_flag=True, help="Create it switched off.")
def channel_create(
    server: str,
    project: str,
    name: str,
    kind: str,
    url: str,
    secret_file: str | None,
    secret_env: str | None,
    events: tuple[str, ...],
    rate: int | None,
    group_window: str | None,
    max_attempts: int | None,
    disabled: bool,
) -> None:
    """Create channel NAME."""
    spec = pb.ChannelSpec(
        name=name,
        kind=KINDS[kind],
        url=url,
        secret=_secret(secret_file, secret_env),
        events=list(events),
        enabled=not disabled,
        rate_per_minute=rate or 0,
        max_attempts=max_attempts or 0,
    )
    window = _window(group_window)
    if window is not None:
        spec.group_window.CopyFrom(window)
    stub = _stub(server)
    call(lambda: stub.CreateChannel(pb.CreateChannelRequest(project=project, channel=spec)))


@channels.command("list")
@server_option
@project_option
def channel_list(server: str, project: str) -> None:
    stub = _stub(server)
    call(lambda: stub.ListChannels(pb.ListChannelsRequest(project=project)))


@channels.command("get")
@server_option
@project_option
@click.argument("channel_id")
def channel_get(server: str, project: str, channel_id: str) -> None:
    stub = _stub(server)
    call(lambda: stub.GetChannel(pb.GetChannelRequest(project=project, channel_id=channel_id)))


@channels.command("update")
@server_option
@project_option
@click.argument("channel_id")
@click.option("--url", default=None)
@_secret_options[0]
@_secret_options[1]
@click.option("--event", "events", multiple=True, help="Replace the event kinds (repeat).")
@click.option("--all-events", is_flag=True, help="Route every event kind here.")
@click.option("--enable/--disable", "enabled", default=None)
@click.option("--rate", type=click.IntRange(1, 600), default=None)
@click.option("--group-window", default=None)
@click.option("--max-attempts", type=click.IntRange(1, 30), default=None)
def channel_update(
    server: str,
    project: str,
    channel_id: str,
    url: str | None,
    secret_file: str | None,
    secret_env: str | None,
    events: tuple[str, ...],
    all_events: bool,
    enabled: bool | None,
    rate: int | None,
    group_window: str | None,
    max_attempts: int | None,
) -> None:
    """Change the fields given; the rest stay."""
    request = pb.UpdateChannelRequest(
        project=project,
        channel_id=channel_id,
        secret=_secret(secret_file, secret_env),
        replace_events=bool(events) or all_events,
        events=list(events),
    )
    if url is not None:
        request.url = url
    if enabled is not None:
        request.enabled = enabled
    if rate is not None:
        request.rate_per_minute = rate
    if max_attempts is not None:
        request.max_attempts = max_attempts
    window = _window(group_window)
    if window is not None:
        request.group_window.CopyFrom(window)
    stub = _stub(server)
    call(lambda: stub.UpdateChannel(request))


@channels.command("delete")
@server_option
@project_option
@click.argument("channel_id")
def channel_delete(server: str, project: str, channel_id: str) -> None:
    stub = _stub(server)
    call(lambda: stub.DeleteChannel(pb.DeleteChannelRequest(project=project, channel_id=channel_id)))


@notify.command("messages")
@server_option
@project_option
@click.option("--state", type=click.Choice(list(STATES)), default=None, help="dead: the dead letters.")
@paged
def messages(server: str, project: str, state: str | None, limit: int, all_pages: bool) -> None:
    """Messages delivered, pending or dead, newest first."""
    stub = _stub(server)

    def page(token: str, size: int) -> pb.ListMessagesResponse:
        request = pb.ListMessagesRequest(project=project, page_size=size, page_token=token)
        if state:
            request.state = STATES[state]
        reply: pb.ListMessagesResponse = stub.ListMessages(request)
        return reply

    call_pages(page, "messages", limit, all_pages, "messages")


@notify.command("redeliver")
@server_option
@project_option
@click.argument("message_id")
def redeliver(server: str, project: str, message_id: str) -> None:
    """Send a dead message again."""
    stub = _stub(server)
    call(lambda: stub.RedeliverMessage(pb.RedeliverMessageRequest(project=project, message_id=message_id)))
