"""Several control-plane addresses for the operator commands, and riding out restarts.

`--server a:50051,b:50051` (or `CONTROLPLANE_SERVER`) names replicas. Commands talk to
one at a time through a `ServerChannel`: a call that could not reach a server at all
(nothing accepted the connection) is made again on the next address, which is safe
because no server saw it. A name that resolves to several addresses needs no list:
gRPC's pick_first connects to the first that answers.

Streaming commands (`rollout watch`, `rollout create --watch`, `audit export`) go
further with `Reconnect`: when the stream breaks — a restart, a failover, a replica
going away — they connect again, to the next address if there is one, and resume from
what they already printed, until `--reconnect-deadline` passes without reaching any
server (exit code `EXIT_UNREACHABLE`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import click
import grpc

# Exit codes of the streaming commands (docs/rollouts.md): the rollout's outcome, or the
# server's loss. 1 is a refused call (click's error), 2 a usage error.
EXIT_SUCCEEDED = 0
EXIT_FAILED = 3
EXIT_ROLLED_BACK = 4
EXIT_UNREACHABLE = 5
EXIT_INTERRUPTED = 130

# Statuses a streaming command reconnects after: the server went away or is busy.
# Anything else (NOT_FOUND, PERMISSION_DENIED, …) is an answer, and ends the command.
_RECONNECT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    # A stream cut while the server shut down, or the connection reset under it.
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}
# Between attempts: one client, no stampede to spread; quick enough to catch a restart.
PROBE = 0.5


def split_servers(text: str) -> list[str]:
    targets: list[str] = []
    for raw in text.split(","):
        target = raw.strip()
        if target and target not in targets:
            targets.append(target)
    if not targets:
        raise click.BadParameter("give at least one host:port", param_hint="--server")
    return targets


def never_reached(error: grpc.RpcError) -> bool:
    """The call reached no server: nothing accepted the connection."""
    details = error.details() or ""
    return error.code() == grpc.StatusCode.UNAVAILABLE and (
        "failed to connect to all addresses" in details or "Connection refused" in details
    )


class ServerChannel:
    """A `grpc.Channel` look-alike over one channel per address, using one at a time."""

    def __init__(self, targets: list[str], open_channel: Callable[[str], Any]):
        self.targets = targets
        self._open = open_channel
        self._channels: dict[int, Any] = {}
        self.index = 0

    @property
    def target(self) -> str:
        return self.targets[self.index]

    @property
    def several(self) -> bool:
        return len(self.targets) > 1

    def current(self) -> Any:
        channel = self._channels.get(self.index)
        if channel is None:
            channel = self._channels[self.index] = self._open(self.target)
        return channel

    def move(self) -> str:
        self.index = (self.index + 1) % len(self.targets)
        return self.target

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Unary(self, method, args, kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Routed(self, "unary_stream", method, args, kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Routed(self, "stream_unary", method, args, kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Routed(self, "stream_stream", method, args, kwargs)


class _Routed:
    """A method handle on whichever address is current when it is called."""

    def __init__(self, servers: ServerChannel, kind: str, method: str, args: Any, kwargs: Any):
        self._servers = servers
        self._kind = kind
        self._method = method
        self._args = args
        self._kwargs = kwargs

    def handle(self) -> Any:
        return getattr(self._servers.current(), self._kind)(self._method, *self._args, **self._kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.handle()(*args, **kwargs)


class _Unary(_Routed):
    def __init__(self, servers: ServerChannel, method: str, args: Any, kwargs: Any):
        super().__init__(servers, "unary_unary", method, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        for attempt in range(len(self._servers.targets)):
            try:
                return self.handle()(*args, **kwargs)
            except grpc.RpcError as e:
                if attempt + 1 == len(self._servers.targets) or not never_reached(e):
                    raise
                self._servers.move()
        raise AssertionError("unreachable")  # pragma: no cover


class ServerUnreachable(click.ClickException):
    exit_code = EXIT_UNREACHABLE


class Reconnect:
    """When a streaming command's call fails: give up (an answer), or wait a little and
    let it connect again, to the next address if there is one, until `deadline` seconds
    pass without reaching a server."""

    def __init__(
        self,
        servers: ServerChannel | None,
        deadline: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.servers = servers
        self.deadline = deadline
        self._clock = clock
        self._sleep = sleep
        self._since: float | None = None
        self.attempts = 0

    def progressed(self) -> None:
        """The server answered: the deadline starts again at the next failure."""
        self._since = None

    def failed(self, error: grpc.RpcError) -> None:
        code = error.code()
        summary = f"{code.name}: {error.details()}"
        if code not in _RECONNECT:
            raise click.ClickException(summary)
        now = self._clock()
        self._since = self._since if self._since is not None else now
        if now - self._since >= self.deadline:
            raise ServerUnreachable(f"no server reached for {self.deadline:g}s; last: {summary}")
        self.attempts += 1
        where = self.servers.move() if self.servers is not None and self.servers.several else ""
        click.echo(f"reconnecting{' to ' + where if where else ''} ({summary})", err=True)
        self._sleep(max(PROBE, _retry_after(error)))


def _retry_after(error: grpc.RpcError) -> float:
    for key, value in error.trailing_metadata() or ():
        if key == "retry-after-ms":
            try:
                return min(int(value), 30_000) / 1000.0
            except ValueError:
                return 0.0
    return 0.0


def parse_deadline(text: str) -> float:
    """`90s`, `5m`, `1h` or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    value = text.strip()
    scale = units.get(value[-1:])
    try:
        seconds = float(value[:-1] if scale else value) * (scale or 1)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a duration (90s, 5m, 1h)") from None
    if seconds < 0:
        raise click.BadParameter(f"{text!r} is negative")
    return seconds


reconnect_option = click.option(
    "--reconnect-deadline",
    default="5m",
    show_default=True,
    envvar="CONTROLPLANE_RECONNECT_DEADLINE",
    show_envvar=True,
    help="How long to keep reconnecting (restarts, failovers) before giving up with exit code 5.",
)
