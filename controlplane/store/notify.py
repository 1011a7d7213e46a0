"""Notification channels, the outbox and its messages in SQL."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from controlplane.domain.model.notify import (
    Channel,
    ChannelKind,
    Message,
    MessageState,
    NotificationEvent,
)
from controlplane.store.schema import notification_channels, notification_events, notification_messages

_channels, _events, _messages = notification_channels, notification_events, notification_messages


def _channel(r: Any) -> Channel:
    return Channel(
        id=r.id,
        project=r.project,
        name=r.name,
        kind=ChannelKind(r.kind),
        url=r.url,
        secret=r.secret,
        events=tuple(r.events),
        enabled=r.enabled,
        rate_per_minute=r.rate_per_minute,
        group_window=timedelta(seconds=r.group_window_seconds),
        max_attempts=r.max_attempts,
        created_at=r.created_at,
        updated_at=r.updated_at,
        created_by=r.created_by,
    )


def _event_from_json(d: dict[str, Any]) -> NotificationEvent:
    return NotificationEvent(
        d["project"],
        d["kind"],
        d["subject"],
        d["summary"],
        datetime.fromisoformat(d["at"]),
        d["data"],
        d["id"],
    )


def _message(r: Any) -> Message:
    return Message(
        id=r.id,
        channel_id=r.channel_id,
        project=r.project,
        kind=r.kind,
        events=[_event_from_json(e) for e in r.events],
        state=MessageState(r.state),
        created_at=r.created_at,
        next_attempt_at=r.next_attempt_at,
        attempts=r.attempts,
        last_error=r.last_error,
        last_status=r.last_status,
        delivered_at=r.delivered_at,
    )


def _channel_values(c: Channel) -> dict[str, Any]:
    return {
        "project": c.project,
        "name": c.name,
        "kind": c.kind.value,
        "url": c.url,
        "secret": c.secret,
        "events": list(c.events),
        "enabled": c.enabled,
        "rate_per_minute": c.rate_per_minute,
        "group_window_seconds": c.group_window.total_seconds(),
        "max_attempts": c.max_attempts,
        "created_by": c.created_by,
        "created_at": c.created_at,
        "updated_at": c.updated_at,
    }


class SqlNotify:
    def __init__(self, conn: AsyncConnection, emitted: Callable[[], None] = lambda: None):
        self._conn = conn
        self._emitted = emitted

    # -- the outbox --------------------------------------------------------------------

    async def emit(self, event: NotificationEvent) -> None:
        await self._conn.execute(
            _events.insert().values(
                project=event.project,
                kind=event.kind,
                subject=event.subject[:300],
                summary=event.summary,
                data=dict(event.data),
                created_at=event.at,
            )
        )
        self._emitted()

    async def undispatched(self, limit: int) -> list[NotificationEvent]:
        query = select(_events).where(_events.c.dispatched_at.is_(None)).order_by(_events.c.id).limit(limit)
        if self._conn.dialect.name == "postgresql":
            # Two dispatchers (a lease changing hands) never take the same rows.
            query = query.with_for_update(skip_locked=True)
        return [
            NotificationEvent(r.project, r.kind, r.subject, r.summary, r.created_at, r.data, r.id)
            for r in (await self._conn.execute(query)).all()
        ]

    async def mark_dispatched(self, ids: Collection[int], at: datetime) -> None:
        if ids:
            await self._conn.execute(
                update(_events).where(_events.c.id.in_(list(ids))).values(dispatched_at=at)
            )

    async def outbox_depth(self) -> int:
        return int(
            await self._conn.scalar(select(func.count()).where(_events.c.dispatched_at.is_(None))) or 0
        )

    # -- channels ----------------------------------------------------------------------

    async def channels(self, project: str | None = None) -> list[Channel]:
        query = select(_channels).order_by(_channels.c.project, _channels.c.name)
        if project is not None:
            query = query.where(_channels.c.project == project)
        return [_channel(r) for r in (await self._conn.execute(query)).all()]

    async def channel(self, channel_id: str) -> Channel | None:
        row = (await self._conn.execute(select(_channels).where(_channels.c.id == channel_id))).first()
        return _channel(row) if row is not None else None

    async def channel_named(self, project: str, name: str) -> Channel | None:
        query = select(_channels).where(_channels.c.project == project, _channels.c.name == name)
        row = (await self._conn.execute(query)).first()
        return _channel(row) if row is not None else None

    async def insert_channel(self, channel: Channel) -> None:
        await self._conn.execute(_channels.insert().values(id=channel.id, **_channel_values(channel)))

    async def update_channel(self, channel: Channel) -> None:
        await self._conn.execute(
            update(_channels).where(_channels.c.id == channel.id).values(**_channel_values(channel))
        )

    async def delete_channel(self, channel_id: str) -> None:
        await self._conn.execute(delete(_messages).where(_messages.c.channel_id == channel_id))
        await self._conn.execute(delete(_channels).where(_channels.c.id == channel_id))

    # -- messages ----------------------------------------------------------------------

    async def open_message(self, channel_id: str, kind: str) -> Message | None:
        """A message of `kind` for the channel not attempted yet (waiting for its group
        window or held by the rate limit): new events of its kind join it."""
        query = (
            select(_messages)
            .where(
                _messages.c.channel_id == channel_id,
                _messages.c.kind == kind,
                _messages.c.state == MessageState.PENDING.value,
                _messages.c.attempts == 0,
            )
            .order_by(_messages.c.created_at.desc())
            .limit(1)
        )
        row = (await self._conn.execute(query)).first()
        return _message(row) if row is not None else None

    async def insert_message(self, message: Message) -> None:
        await self._conn.execute(
            _messages.insert().values(
                id=message.id,
                channel_id=message.channel_id,
                project=message.project,
                kind=message.kind,
                events=[e.to_json() for e in message.events],
                state=message.state.value,
                attempts=message.attempts,
                created_at=message.created_at,
                next_attempt_at=message.next_attempt_at,
                last_error="",
                last_status=0,
            )
        )

    async def extend_message(self, message_id: str, events: Sequence[NotificationEvent]) -> bool:
        """Add events to a message not yet attempted (False if an attempt began)."""
        row = (
            await self._conn.execute(
                select(_messages.c.events).where(_messages.c.id == message_id, _messages.c.attempts == 0)
            )
        ).first()
        if row is None:
            return False
        result = await self._conn.execute(
            update(_messages)
            .where(_messages.c.id == message_id, _messages.c.attempts == 0)
            .values(events=[*row.events, *(e.to_json() for e in events)])
        )
        return bool(result.rowcount)

    async def due(self, now: datetime, limit: int) -> list[Message]:
        query = (
            select(_messages)
            .where(_messages.c.state == MessageState.PENDING.value, _messages.c.next_attempt_at <= now)
            .order_by(_messages.c.next_attempt_at)
            .limit(limit)
        )
        return [_message(r) for r in (await self._conn.execute(query)).all()]

    async def started_since(self, channel_id: str, since: datetime) -> int:
        """Messages of the channel begun at or after `since` and already attempted: what
        its rate limit counts."""
        query = select(func.count()).where(
            _messages.c.channel_id == channel_id, _messages.c.attempts > 0, _messages.c.created_at >= since
        )
        return int(await self._conn.scalar(query) or 0)

    async def begin_attempt(self, message_id: str, attempts: int, retry_at: datetime) -> bool:
        """Count the attempt before it is made (so attempt numbers only rise, whoever
        makes the next one) and push the message's next try to `retry_at` in case this
        process dies during it. False if another worker began it meanwhile."""
        result = await self._conn.execute(
            update(_messages)
            .where(
                _messages.c.id == message_id,
                _messages.c.attempts == attempts,
                _messages.c.state == MessageState.PENDING.value,
            )
            .values(attempts=attempts + 1, next_attempt_at=retry_at)
        )
        return bool(result.rowcount)

    async def record(
        self,
        message_id: str,
        attempts: int,
        state: MessageState,
        status: int,
        error: str,
        next_attempt_at: datetime,
        delivered_at: datetime | None,
    ) -> None:
        await self._conn.execute(
            update(_messages)
            .where(_messages.c.id == message_id, _messages.c.attempts == attempts)
            .values(
                state=state.value,
                last_status=status,
                last_error=error[:1000],
                next_attempt_at=next_attempt_at,
                delivered_at=delivered_at,
            )
        )

    async def message(self, message_id: str) -> Message | None:
        row = (await self._conn.execute(select(_messages).where(_messages.c.id == message_id))).first()
        return _message(row) if row is not None else None

    async def messages(
        self, project: str, state: MessageState | None, limit: int, before: str
    ) -> list[Message]:
        query = select(_messages).where(_messages.c.project == project)
        if state is not None:
            query = query.where(_messages.c.state == state.value)
        if before:
            query = query.where(_messages.c.id < before)
        query = query.order_by(_messages.c.id.desc()).limit(limit)
        return [_message(r) for r in (await self._conn.execute(query)).all()]

    async def redeliver(self, message_id: str, now: datetime) -> bool:
        result = await self._conn.execute(
            update(_messages)
            .where(and_(_messages.c.id == message_id, _messages.c.state == MessageState.DEAD.value))
            .values(state=MessageState.PENDING.value, next_attempt_at=now)
        )
        return bool(result.rowcount)
