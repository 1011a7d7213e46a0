"""`python -m controlplane.healthprobe`: exit 0 if the server's gRPC health service says
SERVING, 1 otherwise with one line saying why. The image's HEALTHCHECK (no
grpc_health_probe is packaged); it needs only grpcio and grpcio-health-checking.

By default it asks the address `CONTROLPLANE_LISTEN` names, on loopback when that is a
wildcard (`0.0.0.0:50051` -> `127.0.0.1:50051`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def default_server(listen: str | None = None) -> str:
    listen = listen or os.environ.get("CONTROLPLANE_LISTEN", "") or "127.0.0.1:50051"
    host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def check(server: str, service: str = "", timeout: float = 3.0, tls_ca: Path | None = None) -> str | None:
    """None when SERVING, else why not."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls_ca is None:
        channel = grpc.insecure_channel(server)
    else:
        channel = grpc.secure_channel(server, grpc.ssl_channel_credentials(tls_ca.read_bytes()))
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as e:
            details = (e.details() or "").splitlines()[0][:200] if e.details() else ""
            return f"{server}: {e.code().name} {details}".rstrip()
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{server}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m controlplane.healthprobe", description=__doc__.splitlines()[0]
    )
    p.add_argument("--server", default=default_server(), help="host:port (default: from CONTROLPLANE_LISTEN)")
    p.add_argument("--service", default="", help="a service name; empty asks for the whole server")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    p.add_argument("--tls-ca", type=Path, default=None, help="CA of the server's certificate; enables TLS")
    args = p.parse_args(argv)
    problem = check(args.server, args.service, args.timeout, args.tls_ca)
    if problem is not None:
        print(f"not healthy: {problem}", file=sys.stderr)
        sys.exit(1)
    print(f"{args.server}: SERVING")


if __name__ == "__main__":
    main()
