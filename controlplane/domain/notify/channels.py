"""NotificationDirectory: channels over the API (create, get, list, change, delete), the
messages delivered to them, and redelivering a dead one.

A channel's secret (its HMAC key, or a PagerDuty routing key) is write-only: it is stored,
used to sign or route, and never returned, audited or logged — answers and audit entries
say only whether one is set, and whether a change replaced it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from urllib.parse import urlsplit

from controlplane.domain.audit.context import current_actor
from controlplane.domain.kernel import validation
from controlplane.domain.kernel.addresses import Network, literal_reason
from controlplane.domain.kernel.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from controlplane.domain.kernel.secrets import new_id
from controlplane.domain.model.notify import EVENT_KINDS, Channel, ChannelKind, Message, MessageState
from controlplane.domain.ports import Clock, Store, Tx
from controlplane.domain.projects import require_project

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,98}[a-z0-9])?$")
MAX_URL = 2000
MAX_SECRET = 4096


@dataclass(frozen=True, slots=True)
class ChannelChange:
    """An update: None leaves a field as it is; `secret` "" leaves the secret."""

    url: str | None = None
    secret: str = ""
    events: Sequence[str] | None = None
    enabled: bool | None = None
    rate_per_minute: int | None = None
    group_window: timedelta | None = None
    max_attempts: int | None = None


@dataclass
class NotificationDirectory:
    store: Store
    clock: Clock
    # Networks a channel's URL may name although internal (`--outbound-allow`).
    allow: Sequence[Network]
    # Wakes the delivery worker (a redelivery, a new channel).
    wake: Callable[[], None]

    def validated(self, channel: Channel) -> Channel:
        if not _NAME.match(channel.name):
            raise InvalidArgument(
                "1-100 of a-z, 0-9 and '-', starting and ending alphanumeric", field="channel.name"
            )
        url = urlsplit(channel.url)
        if url.scheme not in ("http", "https") or not url.hostname or len(channel.url) > MAX_URL:
            raise InvalidArgument(
                f"{channel.url[:100]!r} is not an http(s) URL with a host", field="channel.url"
            )
        reason = literal_reason(url.hostname, self.allow)
        if reason:
            raise InvalidArgument(f"refused: {reason}", field="channel.url")
        unknown = sorted(set(channel.events) - EVENT_KINDS)
        if unknown:
            raise InvalidArgument(
                f"unknown event kind {unknown[0]!r}; known: {', '.join(sorted(EVENT_KINDS))}",
                field="channel.events",
            )
        if len(channel.secret) > MAX_SECRET:
            raise InvalidArgument(f"at most {MAX_SECRET} characters", field="channel.secret")
        if channel.kind is ChannelKind.PAGERDUTY and not channel.secret:
            raise InvalidArgument(
                "a PagerDuty channel needs its routing key as the secret", field="channel.secret"
            )
        if not 1 <= channel.rate_per_minute <= 600:
            raise InvalidArgument(
                f"{channel.rate_per_minute} is outside [1, 600]", field="channel.rate_per_minute"
            )
        window = channel.group_window.total_seconds()
        if not 0 <= window <= 3600:
            raise InvalidArgument(f"{window:g}s is outside [0s, 3600s]", field="channel.group_window")
        if not 1 <= channel.max_attempts <= 30:
            raise InvalidArgument(f"{channel.max_attempts} is outside [1, 30]", field="channel.max_attempts")
        return replace(channel, events=tuple(sorted(set(channel.events))))

    async def create(self, channel: Channel) -> Channel:
        now = self.clock()
        channel = self.validated(
            replace(
                channel,
                id=new_id("ch"),
                created_at=now,
                updated_at=now,
                created_by=str(current_actor()),
            )
        )
        async with self.store.write() as tx:
            await require_project(tx, channel.project)
            if await tx.notify.channel_named(channel.project, channel.name) is not None:
                raise AlreadyExists(
                    f"project {channel.project!r} has a channel named {channel.name!r}", field="channel.name"
                )
            await tx.notify.insert_channel(channel)
            await tx.audit.record(
                "notify.channel.create",
                f"channel/{channel.id}",
                project=channel.project,
                after=channel.public(),
            )
        return channel

    async def get(self, project: str, channel_id: str) -> Channel:
        async with self.store.read() as tx:
            return await _require(tx, project, channel_id)

    async def channels(self, project: str) -> list[Channel]:
        async with self.store.read() as tx:
            await require_project(tx, project)
            return await tx.notify.channels(project)

    async def update(self, project: str, channel_id: str, change: ChannelChange) -> Channel:
        async with self.store.write() as tx:
            before = await _require(tx, project, channel_id)
            after = self.validated(
                replace(
                    before,
                    url=before.url if change.url is None else change.url,
                    secret=change.secret or before.secret,
                    events=before.events if change.events is None else tuple(change.events),
                    enabled=before.enabled if change.enabled is None else change.enabled,
                    rate_per_minute=before.rate_per_minute
                    if change.rate_per_minute is None
                    else change.rate_per_minute,
                    group_window=before.group_window if change.group_window is None else change.group_window,
                    max_attempts=before.max_attempts if change.max_attempts is None else change.max_attempts,
                    updated_at=self.clock(),
                )
            )
            await tx.notify.update_channel(after)
            await tx.audit.record(
                "notify.channel.update",
                f"channel/{channel_id}",
                project=project,
                before=before.public(),
                after={**after.public(), "secret_replaced": bool(change.secret)},
            )
        return after

    async def delete(self, project: str, channel_id: str) -> Channel:
        async with self.store.write() as tx:
            channel = await _require(tx, project, channel_id)
            await tx.notify.delete_channel(channel_id)
            await tx.audit.record(
                "notify.channel.delete", f"channel/{channel_id}", project=project, before=channel.public()
            )
        return channel

    async def messages(
        self, project: str, state: MessageState | None, page_size: int, page_token: str
    ) -> tuple[list[Message], str]:
        limit = validation.page_size(page_size)
        before = validation.decode_page_token(page_token)
        async with self.store.read() as tx:
            await require_project(tx, project)
            found = await tx.notify.messages(project, state, limit + 1, before)
        token = validation.encode_page_token(found[limit - 1].id) if len(found) > limit else ""
        return found[:limit], token

    async def redeliver(self, project: str, message_id: str) -> Message:
        async with self.store.write() as tx:
            message = await tx.notify.message(message_id) if message_id else None
            if message is None or message.project != project:
                raise NotFound(
                    f"message {message_id!r} does not exist in project {project!r}", field="message_id"
                )
            if not await tx.notify.redeliver(message_id, self.clock()):
                raise FailedPrecondition(
                    f"message {message_id} is {message.state.value}; only a dead message is redelivered",
                    field="message_id",
                )
            await tx.audit.record(
                "notify.redeliver",
                f"message/{message_id}",
                project=project,
                after={"channel": message.channel_id, "attempts": message.attempts},
            )
            redelivered = await tx.notify.message(message_id)
        self.wake()
        assert redelivered is not None
        return redelivered


async def _require(tx: Tx, project: str, channel_id: str) -> Channel:
    channel = await tx.notify.channel(channel_id) if channel_id else None
    if channel is None or channel.project != project:
        raise NotFound(f"channel {channel_id!r} does not exist in project {project!r}", field="channel_id")
    return channel
