"""Real processes for end-to-end tests: a control plane server and agents.

`ServerProcess` runs `python -m controlplane serve` on a fixed port and data dir, so it can
be stopped, SIGKILLed and started again where agents expect it. `AgentProcess` runs
`python -m agent_stub` with its own state dir and log file; it trusts the signing keys
file its server wrote into its data dir (`--trusted-keys`), as the command `serve`
prints does, unless told otherwise. `ControlClient` is the operator side over gRPC
(upload, assign, look at nodes). Every wait polls a condition against a deadline;
nothing sleeps to synchronize.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from controlplane.api.bundle.v1 import bundle_pb2, bundle_pb2_grpc
from controlplane.api.node.v1 import node_pb2, node_pb2_grpc
from tests.support.eventually import eventually

T = TypeVar("T")
CHUNK = 1024 * 1024
# Reconnect quickly after a server restart: tests restart servers on purpose.
CLIENT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
# Fast agents for tests: a dead stream is noticed within seconds and backoff stays short.
FAST_AGENT_ARGS = (
    "--liveness-timeout",
    "5",
    "--backoff-base",
    "0.2",
    "--backoff-cap",
    "2",
    "--heartbeat-interval",
    "1",
)


@dataclass(frozen=True)
class ClientTls:
    """How a test client reaches a TLS server: the CA to trust, and for mutual TLS its
    own certificate and key."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes() if self.key is not None else None,
            certificate_chain=self.cert.read_bytes() if self.cert is not None else None,
        )


def open_channel(address: str, tls: ClientTls | None = None, options: Sequence[tuple[str, Any]] = ()) -> Any:
    """A `grpc.aio` channel to `address`: plaintext, or TLS with `tls`."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(address, tls.credentials(), options=list(options))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GRPC_VERBOSITY", "ERROR")
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def wait_until(
    check: Callable[[], Awaitable[T]], timeout: float = 15.0, what: str = "condition", interval: float = 0.1
) -> T:
    """Poll `check` (which raises AssertionError until it holds) until `timeout`."""
    return await eventually(check, timeout=timeout, interval=interval, what=what)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _spawn(
    args: list[str],
    log_path: Path,
    banner: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start `args` with stdout and stderr appended to `log_path` after a banner line."""
    with log_path.open("ab") as out:
        out.write(f"=== {banner}\n".encode())
        out.flush()
        return subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env={**_env(), **(env or {})}, cwd=cwd
        )


async def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    return await asyncio.to_thread(proc.wait, timeout)


_SERVER_NUMBERS = itertools.count(1)


@dataclass
class ServerProcess:
    """`controlplane serve` on a data dir, restartable in place.

    The first start binds port 0 (and, with `metrics_port=0`, a metrics port 0) and reads
    the ports the server prints; later starts bind the same ports again, where agents
    expect the server. Never "find a free port, then bind": parallel workers would race
    for it."""

    data_dir: Path
    port: int = 0
    bookmark_interval: float = 1.0
    # Told to agents in every Heartbeat reply.
    heartbeat_interval: float = 1.0
    # None: no metrics endpoint; 0: one on a port the server picks.
    metrics_port: int | None = None
    extra_args: Sequence[str] = ()
    # For a server started with --tls-cert: how the test's own clients reach it.
    tls: ClientTls | None = None
    # Pass the options above as CONTROLPLANE_* environment variables instead of flags.
    via_environment: bool = False
    # The interpreter to run it with (another virtual environment's); default: this one.
    python: str = ""
    # Run in `data_dir`'s parent with `--data-dir <its name>`, as `make run` runs with
    # the default relative `data`: every path the server hands on must still resolve.
    relative_data_dir: bool = False
    # Serving processes (`--workers`): one unless a test asks for more (tests/e2e/
    # test_workers.py); None: the server's default, as `make run` runs.
    workers: str | None = "1"
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Replicas may share a data dir's parent and name: each keeps its own log.
        self._log_name = f"{self.data_dir.name}-{next(_SERVER_NUMBERS)}.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / self._log_name

    @property
    def token(self) -> str:
        return (self.data_dir / "enrollment-token").read_text().strip()

    @property
    def trusted_keys(self) -> Path:
        """The public signing keys file every start writes (what agents trust)."""
        return self.data_dir / "trusted-keys.json"

    @property
    def admin_key(self) -> str:
        """The global admin API key the first start wrote to the data dir."""
        path = self.data_dir / "admin-key"
        return path.read_text().strip() if path.exists() else ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def start(self, timeout: float | None = None) -> None:
        assert not self.running, "server already running"
        many = self.workers != "1" or "--workers" in self.extra_args
        if timeout is None:
            # Several serving processes start after the first-start work (serve --workers).
            timeout = 60.0 if many else 20.0
        metrics = "" if self.metrics_port is None else f"127.0.0.1:{self.metrics_port}"
        options = {
            "data-dir": self.data_dir.name if self.relative_data_dir else str(self.data_dir),
            "listen": self.address,
            "metrics-listen": metrics,
            "bookmark-interval": str(self.bookmark_interval),
            "heartbeat-interval": str(self.heartbeat_interval),
        }
        if self.workers is not None and "--workers" not in self.extra_args:
            options["workers"] = self.workers
        env = {f"CONTROLPLANE_{k.upper().replace('-', '_')}": v for k, v in options.items()}
        flags = [] if self.via_environment else [a for k, v in options.items() for a in (f"--{k}", v)]
        args = [self.python or sys.executable, "-m", "controlplane", "serve", *flags, *self.extra_args]
        mark = self.log_path.stat().st_size if self.log_path.exists() else 0
        banner = f"start #{self.starts + 1}: {' '.join(args)}"
        if self.via_environment:
            banner += f" with {env}"
        cwd = self.data_dir.parent if (self.python or self.relative_data_dir) else None
        self.proc = _spawn(args, self.log_path, banner, env if self.via_environment else None, cwd)
        self.starts += 1

        async def ready() -> None:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{_tail(self.log_path)}")
            text = self.log_path.read_bytes()[mark:].decode(errors="replace")
            serving = re.search(r"controlplane serving on \S+ \(port (\d+)\)", text)
            assert serving, "not serving yet"
            self.port = int(serving.group(1))
            if self.metrics_port is not None:
                found = re.search(r"metrics on http://[^:/]+:(\d+)/metrics", text)
                assert found, "no metrics address printed yet"
                self.metrics_port = int(found.group(1))
            await self.health()

        try:
            await wait_until(ready, timeout, "server start")
        except BaseException:
            # A server that never got ready is the test's failure, not a process left
            # running for the rest of the suite (a caller may not reach its close()).
            await self.close()
            raise
        _ADMIN_KEYS[self.address] = self.admin_key
        _TRUSTED_KEYS[self.address] = self.trusted_keys

    async def health(self) -> None:
        """Health/Check answers SERVING (AssertionError otherwise)."""
        channel = open_channel(self.address, self.tls)
        try:
            call = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=lambda _: b"",
                response_deserializer=lambda b: b,
            )
            try:
                reply = await call(None, timeout=2)
            except grpc.RpcError as e:
                raise AssertionError(f"health check failed: {e.code()}") from None
            # HealthCheckResponse{status = 1 (SERVING)} encodes as 08 01.
            assert reply == b"\x08\x01", f"not SERVING: {reply!r}"
        finally:
            await channel.close()

    async def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait: streams get a closing bookmark."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return await _wait_exit(self.proc, timeout)

    async def kill(self) -> None:
        """SIGKILL: no closing bookmarks, connections just die."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        await _wait_exit(self.proc, 10)

    async def restart(self) -> None:
        if self.running:
            await self.stop()
        await self.start()

    async def metrics(self) -> dict[str, float]:
        """The Prometheus endpoint's samples without labels, by name."""
        assert self.metrics_port, "start the server with a metrics_port"
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"

        def fetch() -> str:
            with urllib.request.urlopen(url, timeout=5) as response:
                return str(response.read().decode())

        text = await asyncio.to_thread(fetch)
        samples: dict[str, float] = {}
        for line in text.splitlines():
            match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\s+([-+0-9.eE]+|NaN|[+-]Inf)$", line)
            if match:
                samples[match.group(1)] = float(match.group(2))
        return samples

    async def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await self.stop(timeout=10)
            if self.proc.poll() is None:
                await self.kill()


@dataclass
class AgentProcess:
    """One `python -m agent_stub` process with its own state dir and log."""

    server: str
    token: str
    state_dir: Path
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    apply_command: str = "true"
    project: str = "default"
    extra_args: Sequence[str] = FAST_AGENT_ARGS
    # The keys file to trust; None: the one its server (started here) wrote, unless
    # `extra_args` give --trusted-keys or `trust_server_keys` is off (then the agent
    # pins the control plane's keys at first contact).
    trusted_keys: Path | None = None
    trust_server_keys: bool = True
    # The interpreter to run it with (another virtual environment's); default: this one.
    python: str = ""
    # Extra environment (a fault-injection point: AGENT_STUB_HOLD_AFTER_SWAP).
    env: Mapping[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def log_path(self) -> Path:
        return self.state_dir.parent / f"agent-{self.name}.log"

    def _trust_args(self) -> list[str]:
        keys = self.trusted_keys
        if keys is None and self.trust_server_keys and "--trusted-keys" not in self.extra_args:
            keys = _TRUSTED_KEYS.get(self.server)
        return ["--trusted-keys", str(keys)] if keys is not None else []

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def args(self) -> list[str]:
        labels = ",".join(f"{k}={v}" for k, v in self.labels.items())
        return [
            self.python or sys.executable,
            "-m",
            "agent_stub",
            "--server",
            self.server,
            "--project",
            self.project,
            "--token",
            self.token,
            "--labels",
            labels,
            "--state-dir",
            str(self.state_dir),
            "--name",
            self.name,
            # Empty for an agent driving a proxy (`--proxy nginx` etc. in extra_args).
            *(["--apply-command", self.apply_command] if self.apply_command else []),
            *self._trust_args(),
            *self.extra_args,
        ]

    def start(self) -> None:
        assert not self.running, f"agent {self.name} already running"
        # Another interpreter runs from outside the repository, as ServerProcess.start.
        cwd = self.state_dir.parent if self.python else None
        self.proc = _spawn(self.args(), self.log_path, f"start #{self.starts + 1}", self.env, cwd)
        self.starts += 1

    async def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM; returns the exit code (0 for a clean stop)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return await _wait_exit(self.proc, timeout)

    async def kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        await _wait_exit(self.proc, 10)

    async def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await self.stop(timeout=10)
            if self.proc.poll() is None:
                await self.kill()

    # -- what the agent left on disk ---------------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_since_start(self) -> str:
        """The log of the current (latest) run only."""
        text = self.log()
        marker = f"=== start #{self.starts}\n"
        return text[text.rfind(marker) :] if marker in text else text

    def cursor(self) -> dict[str, Any]:
        path = self.state_dir / "cursor.json"
        return dict(json.loads(path.read_text())) if path.exists() else {}

    def identity(self) -> dict[str, Any]:
        path = self.state_dir / "identity.json"
        return dict(json.loads(path.read_text())) if path.exists() else {}

    @property
    def node_id(self) -> str:
        return str(self.identity().get("node_id", ""))

    async def wait_registered(self, timeout: float = 15.0) -> str:
        """The node id, once the agent has registered and saved it."""

        async def check() -> str:
            node_id = self.node_id
            assert node_id, f"{self.name} has not registered yet:\n{self.log()[-2000:]}"
            return node_id

        return await wait_until(check, timeout, f"{self.name} registered")

    def current(self) -> Path | None:
        """The bundle directory `current` points at."""
        link = self.state_dir / "current"
        return link.resolve() if link.is_symlink() else None

    def current_digest(self) -> str:
        path = self.current()
        return f"sha256:{path.name}" if path is not None else ""

    def current_files(self) -> dict[str, bytes]:
        root = self.current()
        if root is None or not root.is_dir():
            return {}
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    def bundle_dirs(self) -> list[str]:
        bundles = self.state_dir / "bundles"
        return sorted(p.name for p in bundles.iterdir()) if bundles.is_dir() else []

    def mark(self) -> int:
        """A position in the log; pass it as `after` to look only at what follows."""
        return len(self.log())

    def log_after(self, after: int | None = None) -> str:
        return self.log()[after:] if after is not None else self.log_since_start()

    async def wait_log(self, pattern: str, timeout: float = 15.0, after: int | None = None) -> re.Match[str]:
        """Wait until a line of the log (of the current run, or after `after`) matches
        `pattern`, a regular expression."""

        async def check() -> re.Match[str]:
            text = self.log_after(after)
            match = re.search(pattern, text, re.MULTILINE)
            assert match is not None, f"{pattern!r} not in the log of {self.name}:\n{text[-3000:]}"
            return match

        return await wait_until(check, timeout, f"log line {pattern!r}")

    async def wait_current(self, digest: str, timeout: float = 20.0) -> None:
        async def check() -> None:
            assert self.current_digest() == digest, (
                f"{self.name}: current is {self.current_digest() or 'unset'}, want {digest}\n"
                f"{self.log()[-2000:]}"
            )

        await wait_until(check, timeout, f"{self.name} running {digest}")


# The admin key of each server started here, by address: an operator client made with
# just an address (the e2e `control` fixture) acts as that server's first admin.
_ADMIN_KEYS: dict[str, str] = {}
# And the trusted-keys file each wrote, by address: agents started against it trust it.
_TRUSTED_KEYS: dict[str, Path] = {}


class ControlClient:
    """The operator side of the control plane, over gRPC."""

    def __init__(self, address: str, credential: str = "", tls: ClientTls | None = None):
        self.address = address
        credential = credential or _ADMIN_KEYS.get(address, "")
        # Sent as `authorization: Bearer <credential>` (an operator API key).
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {credential}"),) if credential else ()
        )
        self.channel = open_channel(address, tls, CLIENT_OPTIONS)
        self.nodes = node_pb2_grpc.NodeServiceStub(self.channel)
        self.bundles = bundle_pb2_grpc.BundleServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def upload(self, archive: bytes, project: str = "default", version: str = "") -> str:
        async def requests() -> AsyncIterator[bundle_pb2.UploadBundleRequest]:
            header = bundle_pb2.UploadBundleHeader(project=project, version=version)
            for offset in range(0, max(len(archive), 1), CHUNK):
                yield bundle_pb2.UploadBundleRequest(
                    header=header if offset == 0 else None, chunk=archive[offset : offset + CHUNK]
                )

        reply = await self.bundles.UploadBundle(
            requests(), metadata=self.metadata, wait_for_ready=True, timeout=30
        )
        return str(reply.bundle.digest)

    async def assign(
        self,
        digest: str,
        selector: str | None = None,
        nodes: Sequence[str] = (),
        project: str = "default",
        **kwargs: Any,
    ) -> int:
        target = (
            bundle_pb2.Target(selector=selector)
            if selector is not None
            else bundle_pb2.Target(nodes=bundle_pb2.NodeList(node_ids=list(nodes)))
        )
        reply = await self.bundles.AssignBundle(
            bundle_pb2.AssignBundleRequest(project=project, target=target, digest=digest, **kwargs),
            metadata=self.metadata,
            wait_for_ready=True,
            timeout=30,
        )
        return int(reply.revision)

    async def get_node(self, node_id: str) -> node_pb2.Node:
        reply = await self.nodes.GetNode(
            node_pb2.GetNodeRequest(node_id=node_id), metadata=self.metadata, wait_for_ready=True, timeout=10
        )
        node: node_pb2.Node = reply.node
        return node

    async def wait_node(
        self, node_id: str, check: Callable[[node_pb2.Node], bool], timeout: float = 20.0, what: str = "node"
    ) -> node_pb2.Node:
        async def probe() -> node_pb2.Node:
            node = await self.get_node(node_id)
            assert check(node), f"{what}: node is {node}"
            return node

        return await wait_until(probe, timeout, what)
