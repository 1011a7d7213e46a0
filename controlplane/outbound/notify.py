"""Sending notification messages over HTTP: the `NotificationSender` port.

Every request carries `Idempotency-Key` (the message id, the same on every attempt),
`X-Controlplane-Attempt` (1, 2, ...), and — when the channel has a secret —
`X-Controlplane-Signature: sha256=<hex>`, the HMAC-SHA256 with the channel's secret of
`<X-Controlplane-Timestamp>.<body>`, so a receiver can check both origin and freshness.
Each event in a generic webhook body carries its own `idempotency_key`
(`<channel id>.<event id>`): the same on every delivery of the event, unique per event.

Bodies: the generic webhook gets our JSON (docs/notifications.md); a Slack-compatible
incoming webhook gets `{"text": ...}`; PagerDuty gets an Events API v2 `trigger` with the
channel's secret as routing key and the message id as `dedup_key`. Only a 2xx answer
delivers; a redirect is not followed and counts as a failure, like every other answer.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

from controlplane.domain.model.notify import SEVERE, Channel, ChannelKind, Message
from controlplane.outbound.http import OutboundError, OutboundHttp

# How long one attempt may take by default (`--notify-timeout`); the worker's
# ATTEMPT_TIMEOUT leaves room above it.
SEND_TIMEOUT = 10.0
# Lines of a Slack text and events in a PagerDuty event's details.
_SHOWN = 20


def idempotency_key(channel: Channel, event_id: int) -> str:
    return f"{channel.id}.{event_id}"


def body(channel: Channel, message: Message, attempt: int) -> dict[str, Any]:
    if channel.kind is ChannelKind.SLACK:
        return {"text": _text(message)}
    if channel.kind is ChannelKind.PAGERDUTY:
        return {
            "routing_key": channel.secret,
            "event_action": "trigger",
            "dedup_key": message.id,
            "payload": {
                "summary": _headline(message)[:1024],
                "source": f"controlplane/{message.project}",
                "severity": "error" if message.kind in SEVERE else "info",
                "component": message.kind,
                "custom_details": {"events": [e.to_json() for e in message.events[:_SHOWN]]},
            },
        }
    return {
        "message_id": message.id,
        "project": message.project,
        "kind": message.kind,
        "channel": channel.name,
        "attempt": attempt,
        "events": [
            {**e.to_json(), "idempotency_key": idempotency_key(channel, e.id)} for e in message.events
        ],
    }


def signature(secret: str, timestamp: str, payload: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + payload, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def _headline(message: Message) -> str:
    if len(message.events) == 1:
        return message.events[0].summary
    return (
        f"{len(message.events)} {message.kind} events in {message.project}: {message.events[0].summary} ..."
    )


def _text(message: Message) -> str:
    lines = [f"*{message.kind}* ({message.project})"]
    lines += [f"• {e.summary}" for e in message.events[:_SHOWN]]
    if len(message.events) > _SHOWN:
        lines.append(f"(+{len(message.events) - _SHOWN} more)")
    return "\n".join(lines)


class HttpWebhookCaller:
    """Webhook gates: our JSON, signed like a notification, `Idempotency-Key` the same on
    every attempt of one gate at one step."""

    def __init__(self, http: OutboundHttp):
        self._http = http

    async def call(
        self, channel: Channel, payload: Mapping[str, Any], key: str, attempt: int, within: float
    ) -> tuple[int, str]:
        data = json.dumps({**payload, "attempt": attempt}, separators=(",", ":")).encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "controlplane-webhook-gate",
            "Idempotency-Key": key,
            "X-Controlplane-Attempt": str(attempt),
            "X-Controlplane-Timestamp": timestamp,
            "X-Controlplane-Gate": str(payload.get("phase", "")),
        }
        if channel.secret:
            headers["X-Controlplane-Signature"] = signature(channel.secret, timestamp, data)
        try:
            answer = await self._http.request("POST", channel.url, within, body=data, headers=headers)
        except OutboundError as e:
            return 0, str(e)
        return answer.status, _judge(answer.status, answer.headers.get("Location", ""), answer.body)


def _judge(status: int, location: str, body: bytes) -> str:
    if 200 <= status < 300:
        return ""
    if 300 <= status < 400:
        return f"HTTP {status}: redirected to {location[:200] or '?'} (redirects are not followed)"
    return f"HTTP {status}: {body[:200].decode(errors='replace')}"


class HttpNotificationSender:
    def __init__(self, http: OutboundHttp, timeout: float = SEND_TIMEOUT):
        self._http = http
        self._timeout = timeout

    async def send(self, channel: Channel, message: Message, attempt: int) -> tuple[int, str]:
        payload = json.dumps(body(channel, message, attempt), separators=(",", ":")).encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "controlplane-notifications",
            "Idempotency-Key": message.id,
            "X-Controlplane-Attempt": str(attempt),
            "X-Controlplane-Timestamp": timestamp,
            "X-Controlplane-Event-Kind": message.kind,
        }
        if channel.secret and channel.kind is not ChannelKind.PAGERDUTY:
            headers["X-Controlplane-Signature"] = signature(channel.secret, timestamp, payload)
        try:
            answer = await self._http.request(
                "POST", channel.url, self._timeout, body=payload, headers=headers
            )
        except OutboundError as e:
            return 0, str(e)
        if 200 <= answer.status < 300:
            return answer.status, ""
        if 300 <= answer.status < 400:
            where = answer.headers.get("Location", "?")[:200]
            return answer.status, f"HTTP {answer.status}: redirected to {where} (redirects are not followed)"
        return answer.status, f"HTTP {answer.status}: {answer.body[:200].decode(errors='replace')}"
