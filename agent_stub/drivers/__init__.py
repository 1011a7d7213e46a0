"""Proxy drivers: the proxy's side of applying a bundle (`agent_stub.applier.Driver`).

`--proxy nginx|haproxy|envoy` validates a new tree with the proxy's own binary, activates
it atomically, confirms the proxy serves it, reverts on failure, reconciles the proxy
with `current` at start, and reads health and metrics from the proxy's own statistics.
`--proxy command` runs `--apply-command` (anything else, Zentinel included). docs/agent.md
has a recipe for each.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from agent_stub.applier import CommandHook, Driver
from agent_stub.config import AgentConfig
from agent_stub.drivers.base import ProxyDriver
from agent_stub.drivers.command import CommandDriver
from agent_stub.drivers.envoy import EnvoyDriver
from agent_stub.drivers.haproxy import HaproxyDriver
from agent_stub.drivers.nginx import NginxDriver
from agent_stub.logs import EventLog
from controlplane.proxies.binaries import Binary, locate

DRIVERS: dict[str, type[ProxyDriver]] = {"nginx": NginxDriver, "haproxy": HaproxyDriver, "envoy": EnvoyDriver}


def build_driver(
    config: AgentConfig,
    state_dir: Path,
    log: EventLog,
    node_id: Callable[[], str] = lambda: "",
    binary: Binary | None = None,
) -> Driver:
    """The driver `config.proxy` names. BinaryError when its binary cannot be used,
    ValueError for a setting it cannot take; both name the cause in one line."""
    proxy = config.proxy
    if proxy.kind == "command":
        return CommandDriver(
            CommandHook(config.apply_command, config.apply_timeout), proxy.health_url, proxy.health_command
        )
    kind = DRIVERS.get(proxy.kind)
    if kind is None:
        raise ValueError(f"--proxy {proxy.kind!r} is not one of nginx, haproxy, envoy, command")
    found = binary or locate(kind.kind, proxy.binary)
    return kind(found, proxy, state_dir, log, validate_timeout=config.apply_timeout, node_id=node_id)
