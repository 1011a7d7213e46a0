"""Register N benchmark nodes (label env=bench) once per data directory and keep their credentials.

    python -m bench.seed --data-dir .bench-out/data --nodes 10000

Starts its own server on the data directory (or uses `--target`), registers the nodes
`bench-00000` … that are not in `<data-dir>/bench-nodes.json` yet, and appends them there.
Registering a name again would issue a new credential, so nodes already saved are skipped;
later runs of `bench.watch` reuse the data directory and the file.

Node RPCs take a short-lived node token (IdentityService.IssueNodeToken, exchanged for the
credential). Tokens are kept in `<data-dir>/bench-tokens.json` and renewed when fewer than
`--token-margin` seconds of validity are left, so a benchmark run never exchanges tokens
while it measures. Enrollment is rate limited per address: the seeder waits out the
server's `retry-after-ms` hint and goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from bench.common import OUT, ServerProcess
from controlplane.api.identity.v1 import identity_pb2, identity_pb2_grpc
from controlplane.api.node.v1 import node_pb2, node_pb2_grpc

CREDENTIALS = "bench-nodes.json"
TOKENS = "bench-tokens.json"
LABELS = {"env": "bench"}
# A run of bench.watch at 10,000 streams takes ~3 minutes: renew tokens with less left.
TOKEN_MARGIN = 600.0
T = TypeVar("T")


def credentials_path(data_dir: Path) -> Path:
    return data_dir / CREDENTIALS


def load(data_dir: Path) -> list[dict[str, str]]:
    path = credentials_path(data_dir)
    if not path.exists():
        return []
    nodes: list[dict[str, str]] = json.loads(path.read_text())["nodes"]
    return nodes


def save(data_dir: Path, nodes: list[dict[str, str]]) -> None:
    _write(credentials_path(data_dir), {"labels": LABELS, "nodes": nodes})


def _write(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def node_name(i: int) -> str:
    return f"bench-{i:05d}"


def _retry_after(e: grpc.aio.AioRpcError) -> float:
    for key, value in e.trailing_metadata() or ():
        if key == "retry-after-ms":
            return float(value) / 1000
    return 1.0


async def _patient(call: Callable[[], Awaitable[T]]) -> T:
    """Retry on RESOURCE_EXHAUSTED/UNAVAILABLE after the server's hint."""
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as e:
            if e.code() not in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                raise
            await asyncio.sleep(_retry_after(e))


async def register(target: str, token: str, names: list[str], concurrency: int = 16) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    queue = list(reversed(names))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = node_pb2_grpc.NodeServiceStub(channel)

        async def worker() -> None:
            while queue:
                name = queue.pop()
                request = node_pb2.RegisterNodeRequest(
                    project="default", enrollment_token=token, name=name, labels=LABELS, hostname=name
                )
                reply = await _patient(lambda r=request: stub.RegisterNode(r))  # type: ignore[misc]
                out.append({"name": name, "node_id": reply.node_id, "credential": reply.node_credential})
                if len(out) % 1000 == 0:
                    print(f"  registered {len(out)}/{len(names)}", flush=True)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    out.sort(key=lambda n: n["name"])
    return out


def token_expiry(token: str) -> float:
    """`exp` of a JWT, without verifying it (the server does that)."""
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return float(claims["exp"])


async def issue_tokens(target: str, nodes: list[dict[str, str]], concurrency: int = 16) -> dict[str, str]:
    out: dict[str, str] = {}
    queue = list(nodes)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)

        async def worker() -> None:
            while queue:
                n = queue.pop()
                request = identity_pb2.IssueNodeTokenRequest(node_id=n["node_id"])
                md = (("authorization", f"Bearer {n['credential']}"),)
                reply = await _patient(lambda r=request, m=md: stub.IssueNodeToken(r, metadata=m))  # type: ignore[misc]
                out[n["node_id"]] = reply.token
                if len(out) % 2000 == 0:
                    print(f"  tokens {len(out)}/{len(nodes)}", flush=True)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def load_tokens(data_dir: Path) -> dict[str, str]:
    path = data_dir / TOKENS
    return json.loads(path.read_text()) if path.exists() else {}


async def ensure(
    data_dir: Path,
    count: int,
    target: str = "",
    database_url: str = "",
    token_margin: float = TOKEN_MARGIN,
) -> list[dict[str, str]]:
    """Make sure the first `count` bench nodes exist and hold a node token valid for at
    least `token_margin` seconds; returns them in name order, each with its `token`."""
    nodes = load(data_dir)
    have = {n["name"] for n in nodes}
    missing = [node_name(i) for i in range(count) if node_name(i) not in have]
    wanted = {node_name(i) for i in range(count)}
    tokens = load_tokens(data_dir)
    horizon = time.time() + token_margin

    def stale(ns: list[dict[str, str]]) -> list[dict[str, str]]:
        return [
            n
            for n in ns
            if n["name"] in wanted
            and (n["node_id"] not in tokens or token_expiry(tokens[n["node_id"]]) < horizon)
        ]

    if missing or stale(nodes):
        server: ServerProcess | None = None
        if not target:
            server = ServerProcess(
                data_dir, database_url=database_url, cpus=None, log_path=data_dir / "seed.log"
            )
            server.start()
            target = server.target
        try:
            if missing:
                token = (data_dir / "enrollment-token").read_text().strip()
                t = time.monotonic()
                print(f"registering {len(missing)} nodes at {target} ...", flush=True)
                nodes += await register(target, token, missing)
                nodes.sort(key=lambda n: n["name"])
                save(data_dir, nodes)
                print(f"registered {len(missing)} nodes in {time.monotonic() - t:.1f} s", flush=True)
            todo = stale(nodes)
            if todo:
                t = time.monotonic()
                print(f"issuing {len(todo)} node tokens ...", flush=True)
                tokens.update(await issue_tokens(target, todo))
                _write(data_dir / TOKENS, tokens)
                print(f"issued {len(todo)} node tokens in {time.monotonic() - t:.1f} s", flush=True)
        finally:
            if server is not None:
                server.stop()
    return [{**n, "token": tokens[n["node_id"]]} for n in nodes if n["name"] in wanted]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=OUT / "data")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--target", default="", help="an already running server (default: start one)")
    p.add_argument("--database-url", default="")
    p.add_argument("--token-margin", type=float, default=TOKEN_MARGIN, help="renew tokens with less left, s")
    a = p.parse_args(argv)
    nodes = asyncio.run(ensure(a.data_dir, a.nodes, a.target, a.database_url, a.token_margin))
    print(f"{len(nodes)} nodes in {credentials_path(a.data_dir)}, tokens in {a.data_dir / TOKENS}")


if __name__ == "__main__":
    main()
