"""NotificationService: channels and their messages. A channel's secret goes in and
never comes out: answers carry `has_secret` only."""

from __future__ import annotations

from datetime import timedelta

import grpc
from google.protobuf.duration_pb2 import Duration

from controlplane.api.notification.v1 import notification_pb2 as pb
from controlplane.api.notification.v1 import notification_pb2_grpc
from controlplane.domain.kernel.errors import InvalidArgument
from controlplane.domain.model.notify import Channel, ChannelKind, Message, MessageState
from controlplane.domain.notify.channels import ChannelChange, NotificationDirectory
from controlplane.rpc.convert import duration_in, timestamp

KIND = {
    ChannelKind.WEBHOOK: pb.CHANNEL_KIND_WEBHOOK,
    ChannelKind.SLACK: pb.CHANNEL_KIND_SLACK,
    ChannelKind.PAGERDUTY: pb.CHANNEL_KIND_PAGERDUTY,
}
KIND_IN = {v: k for k, v in KIND.items()}
STATE = {
    MessageState.PENDING: pb.MESSAGE_STATE_PENDING,
    MessageState.DELIVERED: pb.MESSAGE_STATE_DELIVERED,
    MessageState.DEAD: pb.MESSAGE_STATE_DEAD,
}
STATE_IN = {v: k for k, v in STATE.items()}
_SUMMARIES = 5


def channel_out(c: Channel) -> pb.Channel:
    window = pb.Channel().group_window
    window.FromTimedelta(c.group_window)
    return pb.Channel(
        id=c.id,
        project=c.project,
        name=c.name,
        kind=KIND[c.kind],
        url=c.url,
        events=list(c.events),
        enabled=c.enabled,
        rate_per_minute=c.rate_per_minute,
        group_window=window,
        max_attempts=c.max_attempts,
        has_secret=bool(c.secret),
        created_by=c.created_by,
        created_at=timestamp(c.created_at),
        updated_at=timestamp(c.updated_at),
    )


def message_out(m: Message) -> pb.NotificationMessage:
    return pb.NotificationMessage(
        id=m.id,
        channel_id=m.channel_id,
        project=m.project,
        kind=m.kind,
        state=STATE[m.state],
        attempts=m.attempts,
        event_ids=[e.id for e in m.events],
        summaries=[e.summary for e in m.events[:_SUMMARIES]],
        created_at=timestamp(m.created_at),
        next_attempt_at=timestamp(m.next_attempt_at),
        delivered_at=timestamp(m.delivered_at),
        last_error=m.last_error,
        last_status=m.last_status,
    )


def _window(d: Duration, field: str) -> timedelta:
    value = duration_in(d, field)
    if value < timedelta(0):
        raise InvalidArgument("must not be negative", field=field)
    return value


class NotificationServicer(notification_pb2_grpc.NotificationServiceServicer):
    def __init__(self, directory: NotificationDirectory):
        self._directory = directory

    async def CreateChannel(
        self, request: pb.CreateChannelRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateChannelResponse:
        spec = request.channel
        if spec.kind not in KIND_IN:
            raise InvalidArgument("webhook, slack or pagerduty", field="channel.kind")
        defaults = Channel("", "", "", ChannelKind.WEBHOOK, "", "")
        channel = Channel(
            id="",
            project=request.project,
            name=spec.name,
            kind=KIND_IN[spec.kind],
            url=spec.url,
            secret=spec.secret,
            events=tuple(spec.events),
            enabled=spec.enabled if spec.HasField("enabled") else True,
            rate_per_minute=spec.rate_per_minute or defaults.rate_per_minute,
            group_window=_window(spec.group_window, "channel.group_window")
            if spec.HasField("group_window")
            else defaults.group_window,
            max_attempts=spec.max_attempts or defaults.max_attempts,
        )
        return pb.CreateChannelResponse(channel=channel_out(await self._directory.create(channel)))

    async def GetChannel(
        self, request: pb.GetChannelRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetChannelResponse:
        return pb.GetChannelResponse(
            channel=channel_out(await self._directory.get(request.project, request.channel_id))
        )

    async def ListChannels(
        self, request: pb.ListChannelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListChannelsResponse:
        channels = await self._directory.channels(request.project)
        return pb.ListChannelsResponse(channels=[channel_out(c) for c in channels])

    async def UpdateChannel(
        self, request: pb.UpdateChannelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateChannelResponse:
        change = ChannelChange(
            url=request.url if request.HasField("url") else None,
            secret=request.secret,
            events=tuple(request.events) if request.replace_events else None,
            enabled=request.enabled if request.HasField("enabled") else None,
            rate_per_minute=request.rate_per_minute if request.HasField("rate_per_minute") else None,
            group_window=_window(request.group_window, "group_window")
            if request.HasField("group_window")
            else None,
            max_attempts=request.max_attempts if request.HasField("max_attempts") else None,
        )
        channel = await self._directory.update(request.project, request.channel_id, change)
        return pb.UpdateChannelResponse(channel=channel_out(channel))

    async def DeleteChannel(
        self, request: pb.DeleteChannelRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteChannelResponse:
        await self._directory.delete(request.project, request.channel_id)
        return pb.DeleteChannelResponse()

    async def ListMessages(
        self, request: pb.ListMessagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListMessagesResponse:
        state = STATE_IN.get(request.state) if request.state else None
        messages, token = await self._directory.messages(
            request.project, state, request.page_size, request.page_token
        )
        return pb.ListMessagesResponse(messages=[message_out(m) for m in messages], next_page_token=token)

    async def RedeliverMessage(
        self, request: pb.RedeliverMessageRequest, context: grpc.aio.ServicerContext
    ) -> pb.RedeliverMessageResponse:
        message = await self._directory.redeliver(request.project, request.message_id)
        return pb.RedeliverMessageResponse(message=message_out(message))
