"""Register N benchmark nodes (label env=bench) once per data directory and keep their credentials.

    python -m bench.seed --data-dir .bench-out/data --nodes 10000

Starts its own server on the data directory (or uses `--target`), registers the nodes
`bench-00000` … that are not in `<data-dir>/bench-nodes.json` yet, and appends them there.
Registering a name again would issue a new credential, so nodes already saved are skipped;
later runs of `bench.watch` reuse the data directory and the file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import grpc

from bench.common import OUT, ServerProcess
from controlplane.api.node.v1 import node_pb2, node_pb2_grpc

CREDENTIALS = "bench-nodes.json"
LABELS = {"env": "bench"}


def credentials_path(data_dir: Path) -> Path:
    return data_dir / CREDENTIALS


def load(data_dir: Path) -> list[dict[str, str]]:
    path = credentials_path(data_dir)
    if not path.exists():
        return []
    nodes: list[dict[str, str]] = json.loads(path.read_text())["nodes"]
    return nodes


def save(data_dir: Path, nodes: list[dict[str, str]]) -> None:
    path = credentials_path(data_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"labels": LABELS, "nodes": nodes}))
    tmp.replace(path)


def node_name(i: int) -> str:
    return f"bench-{i:05d}"


async def register(target: str, token: str, names: list[str], concurrency: int = 16) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    queue = list(reversed(names))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = node_pb2_grpc.NodeServiceStub(channel)

        async def worker() -> None:
            while queue:
                name = queue.pop()
                reply = await stub.RegisterNode(
                    node_pb2.RegisterNodeRequest(
                        project="default", enrollment_token=token, name=name, labels=LABELS, hostname=name
                    )
                )
                out.append({"name": name, "node_id": reply.node_id, "credential": reply.node_credential})
                if len(out) % 1000 == 0:
                    print(f"  registered {len(out)}/{len(names)}", flush=True)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    out.sort(key=lambda n: n["name"])
    return out


async def ensure(
    data_dir: Path, count: int, target: str = "", database_url: str = ""
) -> list[dict[str, str]]:
    """Make sure the first `count` bench nodes exist; returns them in name order."""
    nodes = load(data_dir)
    have = {n["name"] for n in nodes}
    missing = [node_name(i) for i in range(count) if node_name(i) not in have]
    if missing:
        server: ServerProcess | None = None
        if not target:
            server = ServerProcess(data_dir, database_url=database_url, cpus=None)
            server.start()
            target = server.target
        try:
            token = (data_dir / "enrollment-token").read_text().strip()
            t = time.monotonic()
            print(f"registering {len(missing)} nodes at {target} ...", flush=True)
            nodes += await register(target, token, missing)
            nodes.sort(key=lambda n: n["name"])
            save(data_dir, nodes)
            print(f"registered {len(missing)} nodes in {time.monotonic() - t:.1f} s", flush=True)
        finally:
            if server is not None:
                server.stop()
    wanted = {node_name(i) for i in range(count)}
    return [n for n in nodes if n["name"] in wanted]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=OUT / "data")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--target", default="", help="an already running server (default: start one)")
    p.add_argument("--database-url", default="")
    a = p.parse_args(argv)
    nodes: list[Any] = asyncio.run(ensure(a.data_dir, a.nodes, a.target, a.database_url))
    print(f"{len(nodes)} nodes in {credentials_path(a.data_dir)}")


if __name__ == "__main__":
    main()
