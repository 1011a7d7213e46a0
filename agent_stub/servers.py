"""Several control-plane addresses behind one channel-like object.

`--server a:50051,b:50051` names replicas the agent may use; it talks to one at a time
and moves to the next when the one it uses is unreachable or stopping (the watcher
decides: watcher.py). Every stub the agent builds (watch, register, report, heartbeat,
download) goes through a `ServerSet`, whose method handles look up the current server's
channel at call time, so moving takes every kind of call along at once.

A single name that resolves to several addresses needs no list: gRPC's resolver
returns them all and its pick_first policy connects to the first that answers, moving
on when one stops accepting connections.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import grpc

from agent_stub.config import TlsFiles
from agent_stub.rpc import open_channel


def split_servers(text: str) -> list[str]:
    """`a:1, b:2` -> ["a:1", "b:2"], without blanks or repeats, order kept."""
    seen: list[str] = []
    for raw in text.split(","):
        target = raw.strip()
        if target and target not in seen:
            seen.append(target)
    return seen


class ServerSet:
    """One channel per address, and which one is in use."""

    def __init__(
        self,
        targets: list[str],
        tls: TlsFiles | None = None,
        opener: Callable[[str, TlsFiles | None], Any] = open_channel,
    ):
        if not targets:
            raise ValueError("no control plane address")
        self.targets = targets
        self._tls = tls
        self._opener = opener
        self._channels: dict[int, Any] = {}
        self.index = 0
        # Moves since the last call that reached a server: when it reaches len(targets)
        # every address has been tried in this round.
        self.tried = 0

    @property
    def target(self) -> str:
        return self.targets[self.index]

    @property
    def several(self) -> bool:
        return len(self.targets) > 1

    def channel(self) -> Any:
        """The current server's channel (opened on first use)."""
        channel = self._channels.get(self.index)
        if channel is None:
            channel = self._channels[self.index] = self._opener(self.target, self._tls)
        return channel

    def move(self) -> str:
        """Use the next address from now on; returns it."""
        self.index = (self.index + 1) % len(self.targets)
        self.tried += 1
        return self.target

    def reached(self) -> None:
        """A call reached the current server: a new round starts."""
        self.tried = 0

    @property
    def round_done(self) -> bool:
        return self.tried >= len(self.targets)

    def connected(self) -> bool:
        """Whether the current channel has a connection (READY)."""
        channel = self._channels.get(self.index)
        if channel is None:
            return False
        with contextlib.suppress(Exception):
            return bool(channel.get_state(try_to_connect=False) == grpc.ChannelConnectivity.READY)
        return False

    async def close(self) -> None:
        for channel in self._channels.values():
            with contextlib.suppress(Exception):
                await channel.close()
        self._channels.clear()

    # -- the grpc.aio.Channel surface stubs use -----------------------------------------

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Routed(self, "unary_unary", method, args, kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Routed(self, "unary_stream", method, args, kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Routed(self, "stream_unary", method, args, kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Routed(self, "stream_stream", method, args, kwargs)


class _Routed:
    """A method handle bound to whichever channel is current when it is called."""

    def __init__(self, servers: ServerSet, kind: str, method: str, args: tuple[Any, ...], kwargs: Any):
        self._servers = servers
        self._kind = kind
        self._method = method
        self._args = args
        self._kwargs = kwargs
        self._handles: dict[int, Any] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        channel = self._servers.channel()
        handle = self._handles.get(id(channel))
        if handle is None:
            handle = getattr(channel, self._kind)(self._method, *self._args, **self._kwargs)
            self._handles = {id(channel): handle}  # one per channel in use; old ones go
        return handle(*args, **kwargs)
