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

from agent_stub import __version__
from agent_stub.backoff import BackoffPolicy
from agent_stub.config import MIB, AgentConfig, TlsFiles
from agent_stub.state import CorruptState
from agent_stub.unpack import UnpackLimits
from agent_stub.verify import PIN_FILE
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


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agent-stub",
        description="Reference node agent: watch desired state, apply bundles, report back.",
    )
    p.add_argument("--server", required=True, help="control plane host:port")
    p.add_argument("--project", required=True)
    p.add_argument("--token", required=True, help="the project's enrollment token")
    p.add_argument("--labels", type=parse_labels, default={}, help="node labels, k=v[,k=v]")
    p.add_argument("--state-dir", type=Path, required=True, help="identity, cursor and bundles")
    p.add_argument("--apply-command", required=True, help="shell command run in each new bundle dir")
    p.add_argument("--apply-timeout", type=positive_float, default=60.0, help="seconds (default 60)")
    p.add_argument("--name", default="", help="node name (default: saved name, then hostname)")
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


def config_from(args: argparse.Namespace) -> AgentConfig:
    return AgentConfig(
        server=args.server,
        project=args.project,
        token=args.token,
        labels=args.labels,
        state_dir=args.state_dir,
        apply_command=args.apply_command,
        apply_timeout=args.apply_timeout,
        name=args.name,
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
    args = build_parser().parse_args(argv)
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
            asyncio.run(_run(config_from(args)))
    finally:
        traces.shutdown()
    sys.exit(0)
