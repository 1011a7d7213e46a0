"""Ports for processes whose configuration must name one before they start (a proxy's
listener in its config file, Envoy's listener resources).

Whatever can bind port 0 and report the port does so (servers, upstreams, moto). For the
rest, ports come from a range below the kernel's ephemeral range (32768+, where port 0
and outgoing connections land) that belongs to this xdist worker alone, so neither
another worker nor the kernel hands the same port out meanwhile.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
from collections.abc import Iterator

_LOW, _SPAN = 10_000, 5_000  # four workers fit below 32768
_worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_next = itertools.cycle(range(_LOW + (_worker % 4) * _SPAN, _LOW + (_worker % 4 + 1) * _SPAN))


def unused_port() -> int:
    """A loopback port of this worker's range that nothing is bound to now."""
    for _ in range(_SPAN):
        port = next(_next)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port left in this worker's range from {_LOW + (_worker % 4) * _SPAN}")


def nobody_listens() -> contextlib.AbstractContextManager[str]:
    """An http:// URL on a loopback port this process holds bound but never listens on:
    connecting is refused for as long as the block runs."""

    @contextlib.contextmanager
    def held() -> Iterator[str]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"

    return held()
