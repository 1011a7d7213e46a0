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


@dataclass(frozen=True)
class AgentConfig:
    # host:port of the control plane.
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
    # Stable node name in the project; defaults to the saved one, then the hostname.
    name: str = ""
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
