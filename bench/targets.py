"""The servers `bench.compare` measures side by side, behind one small interface.

  etcd          Debian's etcd 3.4, one member (bench/etcdserver.py); a write is a Put on
                the one key every watcher watches.
  controlplane  `controlplane serve` on the benchmark data directory (bench/seed.py); a
                write is an AssignBundle to the selector every benchmark node matches.
  bare          bench/bareserver.py, one process per core on one port; a write is one
                Publish to every process.

Each answers where its streams connect, which protocol the load generator speaks to it,
the pids of all its server processes (CPU and PSS are summed over them), and how to make
one write that every watcher sees.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from bench import procstat, seed
from bench.common import OUT, Operator, ServerProcess, bench_bundle, metric_sum, pinned
from bench.etcdapi import EtcdApi
from bench.etcdserver import EtcdProcess

# etcd's value is about the size of the control plane's DesiredState message (a digest,
# a signature, a key id, the revisions), so both carry a comparable payload per event.
ETCD_VALUE_BYTES = 200
ETCD_KEY = b"bench/fleet"


class Target:
    name = ""
    proto = "cp"  # what the load generator speaks: "cp" (WatchBundles) or "etcd"

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    @property
    def address(self) -> str:
        raise NotImplementedError

    def pids(self) -> list[int]:
        raise NotImplementedError

    def nodes(self) -> list[dict[str, str]]:
        raise NotImplementedError

    async def write(self, tag: str) -> tuple[int, float, float]:
        """One change every watcher sees: (revision, wall time before, wall time acked)."""
        raise NotImplementedError

    async def counters(self) -> dict[str, float]:
        """Bootstraps and resumes so far, where the server counts them."""
        return {}

    def info(self) -> dict[str, Any]:
        return {}


def synthetic_nodes(n: int) -> list[dict[str, str]]:
    return [{"node_id": seed.node_name(i)} for i in range(n)]


class EtcdTarget(Target):
    name = "etcd"
    proto = "etcd"

    def __init__(self, api: EtcdApi, n: int, cpus: str | None, extra_args: Sequence[str], run_id: str):
        self.api = api
        self.n = n
        self.server = EtcdProcess(api, cpus=cpus, extra_args=extra_args, log_path=OUT / f"etcd-{run_id}.log")
        self.channel: grpc.aio.Channel | None = None
        self.seq = 0

    async def start(self) -> None:
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(self.server.target)
        self.kv = self.api.grpc.KVStub(self.channel)

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        self.server.stop()

    @property
    def address(self) -> str:
        return self.server.target

    def pids(self) -> list[int]:
        return procstat.tree(self.server.pid)

    def nodes(self) -> list[dict[str, str]]:
        return synthetic_nodes(self.n)

    async def write(self, tag: str) -> tuple[int, float, float]:
        self.seq += 1
        value = f"{tag}:{self.seq}:".encode().ljust(ETCD_VALUE_BYTES, b".")
        t0 = time.time()
        reply = await self.kv.Put(self.api.rpc.PutRequest(key=ETCD_KEY, value=value))
        return int(reply.header.revision), t0, time.time()

    def info(self) -> dict[str, Any]:
        return {"version": self.server.version(), "command": " ".join(self.server.command)}


class ControlPlaneTarget(Target):
    name = "controlplane"

    def __init__(
        self,
        n: int,
        data_dir: Path,
        database_url: str,
        cpus: str | None,
        extra_args: Sequence[str],
        run_id: str,
    ):
        self.n = n
        self.data_dir = data_dir
        self.database_url = database_url
        self.cpus = cpus
        self.extra_args = list(extra_args)
        self.run_id = run_id
        self._nodes: list[dict[str, str]] = []
        self.server: ServerProcess | None = None
        self.op: Operator | None = None
        self.bundles: list[str] = []

    async def start(self) -> None:
        # Tokens are renewed here, before the server under test starts, never while measuring.
        self._nodes = await seed.ensure(self.data_dir, self.n, database_url=self.database_url)
        if len(self._nodes) < self.n:
            raise SystemExit(f"only {len(self._nodes)} nodes seeded in {self.data_dir}")
        self.server = ServerProcess(
            self.data_dir,
            database_url=self.database_url,
            cpus=self.cpus,
            extra_args=self.extra_args,
            log_path=OUT / f"server-{self.run_id}.log",
        )
        self.server.start()
        self.op = Operator(self.server.target, self.data_dir)
        self.bundles = [await self.op.upload(bench_bundle(name)) for name in ("fleet-a", "fleet-b")]

    async def stop(self) -> None:
        if self.op is not None:
            await self.op.close()
        if self.server is not None:
            self.server.stop()

    @property
    def address(self) -> str:
        assert self.server is not None
        return self.server.target

    def pids(self) -> list[int]:
        assert self.server is not None
        return procstat.tree(self.server.pid)

    def nodes(self) -> list[dict[str, str]]:
        return self._nodes[: self.n]

    async def write(self, tag: str) -> tuple[int, float, float]:
        assert self.op is not None
        self.bundles.reverse()
        # A unique annotation makes every write a change, whichever bundle it names.
        return await self.op.assign(self.bundles[0], selector="env=bench", annotations={"bench-round": tag})

    async def counters(self) -> dict[str, float]:
        assert self.server is not None
        m = await asyncio.to_thread(self.server.metrics)
        return {
            "bootstraps": metric_sum(m, "controlplane_watch_bootstraps_total"),
            "resumes": metric_sum(m, "controlplane_watch_resumes_total"),
        }

    def info(self) -> dict[str, Any]:
        return {"command": " ".join(self.server.command) if self.server else ""}


_BARE = re.compile(r"\(port (\d+)\) \(control (\d+)\)")


class BareTarget(Target):
    name = "bare"

    def __init__(self, n: int, processes: int, cpus: str | None, run_id: str):
        self.n = n
        self.processes = processes
        self.cpus = cpus
        self.run_id = run_id
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = 0
        self.controls: list[grpc.aio.Channel] = []
        self.revision = 0

    def _spawn(self, i: int, port: int) -> tuple[int, int]:
        log_path = OUT / f"bare-{self.run_id}-{i}.log"
        cmd = [sys.executable, "-m", "bench.bareserver", "--listen", f"127.0.0.1:{port}"]
        cmd = pinned([*cmd, "--epoch", f"bare-{self.run_id}"], self.cpus)
        with log_path.open("wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = _BARE.search(log_path.read_text(errors="replace"))
            if m:
                return int(m.group(1)), int(m.group(2))
            if proc.poll() is not None:
                raise RuntimeError(f"bareserver exited with {proc.returncode}; see {log_path}")
            time.sleep(0.05)
        raise TimeoutError(f"bareserver did not start; see {log_path}")

    async def start(self) -> None:
        for i in range(self.processes):
            # The first binds a free port; the others share it (grpc sets SO_REUSEPORT).
            port, control = await asyncio.to_thread(self._spawn, i, self.port)
            self.port = self.port or port
            self.controls.append(grpc.aio.insecure_channel(f"127.0.0.1:{control}"))
        # A first state, as every seeded node has in the control plane: a bootstrap sends
        # it, and a stream's cursor is never 0 (which would mean "bootstrap me" on resume).
        await self.write("initial")

    async def stop(self) -> None:
        for ch in self.controls:
            await ch.close()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                await asyncio.to_thread(proc.wait, 20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def nodes(self) -> list[dict[str, str]]:
        return synthetic_nodes(self.n)

    async def _control(self, method: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        calls = [ch.unary_unary(f"/bench.Bare/{method}")(json.dumps(body).encode()) for ch in self.controls]
        return [json.loads(r) for r in await asyncio.gather(*calls)]

    async def write(self, tag: str) -> tuple[int, float, float]:
        self.revision += 1
        t0 = time.time()
        await self._control("Publish", {"revision": self.revision})
        return self.revision, t0, time.time()

    async def counters(self) -> dict[str, float]:
        stats = await self._control("Stats", {})
        return {k: float(sum(s[k] for s in stats)) for k in ("bootstraps", "resumes")}

    def info(self) -> dict[str, Any]:
        return {"processes": self.processes, "pids": [p.pid for p in self.procs], "cpu_count": os.cpu_count()}
