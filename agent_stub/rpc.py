"""Channel settings and how the agent reads gRPC errors."""

from __future__ import annotations

import enum
from typing import Any

import grpc

from agent_stub.config import TlsFiles

# Keepalive pings every 60 s keep NAT and load-balancer paths warm; the server accepts
# pings down to 20 s, so this never earns a GOAWAY. Permit them without calls so an
# agent waiting out a backoff still notices a dead connection.
KEEPALIVE_TIME_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000
# The channel's own reconnect backoff must stay below ours, or an RPC issued after our
# backoff would still fail fast while the channel sits out a longer one of its own. Its
# cap bounds how soon a probe of a restarted server can get through (backoff.py): a
# channel that failed to connect fails every call at once until its timer fires.
RECONNECT_BACKOFF_MS = 500
MAX_RECONNECT_BACKOFF_MS = 1_000

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
    ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
    ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    # Chunks are 1 MiB; leave headroom for the envelope.
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
)


def open_channel(target: str, tls: TlsFiles | None = None) -> Any:
    """A `grpc.aio.Channel` to the control plane with the agent's options: TLS when `tls`
    names a CA (and a client certificate, for mutual TLS), else plaintext."""
    if tls is None or tls.ca is None:
        return grpc.aio.insecure_channel(target, options=list(CHANNEL_OPTIONS))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes(),
        private_key=tls.key.read_bytes() if tls.key is not None else None,
        certificate_chain=tls.cert.read_bytes() if tls.cert is not None else None,
    )
    options: list[tuple[str, Any]] = list(CHANNEL_OPTIONS)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(target, credentials, options=options)


def bearer(credential: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {credential}"),)


class ErrorClass(enum.Enum):
    # Back off and try again from the cursor.
    RETRY = "retry"
    # The credential was refused: register again, then retry.
    REAUTH = "reauth"
    # The server refuses the request itself; retrying soon will not help. Log loudly and
    # retry at the cap (a fix may be deployed on either side) rather than crash-loop.
    REFUSED = "refused"


_RETRY = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    # A call the server dropped from its accept backlog before it started (storm).
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.OK,
}


def classify(code: Any) -> ErrorClass:
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return ErrorClass.REAUTH
    if code in _RETRY:
        return ErrorClass.RETRY
    return ErrorClass.REFUSED


def unreachable(code: Any, details: str) -> bool:
    """The call never reached a server: nothing accepted the connection (gRPC's
    pick_first says so in these words)."""
    return code == grpc.StatusCode.UNAVAILABLE and (
        "failed to connect to all addresses" in details or "Connection refused" in details
    )


def stopping(code: Any, details: str) -> bool:
    """The server refused the call because it is shutting down (docs/protocol.md)."""
    return code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details


def code_name(code: Any) -> str:
    name = getattr(code, "name", None)
    return str(name) if name else str(code)


def retry_after(metadata: Any) -> float | None:
    """The server's `retry-after-ms` trailing hint, in seconds."""
    if not metadata:
        return None
    for key, value in metadata:
        if key == "retry-after-ms":
            text = value.decode() if isinstance(value, bytes) else str(value)
            try:
                ms = int(text)
            except ValueError:
                return None
            # Never trust a hint to park us forever: the cap still applies.
            return min(max(ms, 0), 300_000) / 1000.0
    return None


def error_summary(error: grpc.RpcError) -> str:
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    code_text = code_name(code()) if callable(code) else "UNKNOWN"
    details_text = details() if callable(details) else str(error)
    return f"{code_text}: {details_text}"
