"""The `command` driver: `--apply-command` for any proxy without a driver of its own
(Zentinel included), with a health source of its own.

The apply command checks and reloads before the swap, as it always did (docs/agent.md
gives its contract). Health never comes from it: an apply command that exited 0 says the
bundle was accepted, not that the proxy serves. `--health-url` (healthy on a 2xx answer)
or `--health-command` (healthy on exit 0; a JSON object it prints adds metrics, as the
metrics file does) say how the proxy is doing; with neither, heartbeats carry no health.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.parse

from agent_stub.applier import ApplyHook, HookDriver
from agent_stub.heartbeat import parse_metrics
from controlplane.api.node.v1 import node_pb2
from controlplane.proxies.http import Address, HttpError, get
from controlplane.proxies.run import run

# A health check is one heartbeat's work: it must not outlast the beat.
HEALTH_TIMEOUT = 5.0


def parse_health_url(url: str) -> tuple[Address, str]:
    """`http://host:port/path`; ValueError naming what is wrong."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"--health-url {url!r}: only http://host[:port]/path is supported")
    address = Address(parts.hostname, parts.port or 80)
    path = parts.path or "/"
    return address, path + (f"?{parts.query}" if parts.query else "")


class CommandDriver(HookDriver):
    name = "command"

    def __init__(self, hook: ApplyHook, health_url: str = "", health_command: str = ""):
        super().__init__(hook)
        self.health_url = parse_health_url(health_url) if health_url else None
        self.health_command = health_command

    async def metrics(self, digest: str) -> node_pb2.NodeMetrics | None:
        if self.health_url is not None:
            address, path = self.health_url
            try:
                response = await get(address, path, seconds=HEALTH_TIMEOUT, limit=64 * 1024)
                healthy = 200 <= response.status < 300
            except HttpError:
                healthy = False
            return node_pb2.NodeMetrics(
                health=node_pb2.HEALTH_STATUS_HEALTHY if healthy else node_pb2.HEALTH_STATUS_UNHEALTHY
            )
        if self.health_command:
            env = {**os.environ, "BUNDLE_DIGEST": digest}
            try:
                done = await run(["/bin/sh", "-c", self.health_command], seconds=HEALTH_TIMEOUT, env=env)
            except OSError:
                return node_pb2.NodeMetrics(health=node_pb2.HEALTH_STATUS_UNHEALTHY)
            out = node_pb2.NodeMetrics()
            text = done.output.strip()
            if text.startswith("{"):
                with contextlib.suppress(ValueError, RecursionError):
                    out.CopyFrom(parse_metrics(json.loads(text)).metrics)
            out.health = node_pb2.HEALTH_STATUS_HEALTHY if done.ok else node_pb2.HEALTH_STATUS_UNHEALTHY
            return out
        return None
