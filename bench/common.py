"""Pieces shared by the benchmark scripts: the server process, its metrics, bundles, pinning."""

from __future__ import annotations

import asyncio
import io
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import grpc
import zstandard

from controlplane.api.bundle.v1 import bundle_pb2, bundle_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / ".bench-out"
WATCH_METHOD = "/controlplane.watch.v1.WatchService/WatchBundles"
CHUNK = 1024 * 1024
# Cores: the server on one, the load generators and the orchestrator on the other.
SERVER_CPU = "0"
CLIENT_CPU = "1"


def can_pin() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


def pinned(cmd: Sequence[str], cpus: str | None) -> list[str]:
    if cpus is None or not can_pin():
        return list(cmd)
    return ["taskset", "-c", cpus, *cmd]


def pin_self(cpus: str | None) -> None:
    if cpus is not None and can_pin():
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})


# -- bundles --------------------------------------------------------------------------


def bundle_archive(files: dict[str, bytes]) -> bytes:
    """A reproducible .tar.zst of `files` (what `controlplane` accepts for upload)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return zstandard.ZstdCompressor().compress(raw.getvalue())


def bench_bundle(tag: str) -> bytes:
    config = json.dumps({"listeners": [{"port": 8080}], "bench": tag}, sort_keys=True).encode()
    return bundle_archive({"config.json": config})


class Operator:
    """Operator calls over one channel of their own, with the admin API key the server
    wrote to its data directory on first start (`<data-dir>/admin-key`), if there is one."""

    def __init__(self, target: str, data_dir: Path | None = None):
        self.channel = grpc.aio.insecure_channel(target)
        self.bundles = bundle_pb2_grpc.BundleServiceStub(self.channel)
        key_file = data_dir / "admin-key" if data_dir else None
        key = key_file.read_text().strip() if key_file and key_file.exists() else ""
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {key}"),) if key else ()

    async def close(self) -> None:
        await self.channel.close()

    async def upload(self, archive: bytes, project: str = "default") -> str:
        async def requests() -> AsyncIterator[bundle_pb2.UploadBundleRequest]:
            header = bundle_pb2.UploadBundleHeader(project=project)
            for offset in range(0, max(len(archive), 1), CHUNK):
                yield bundle_pb2.UploadBundleRequest(
                    header=header if offset == 0 else None, chunk=archive[offset : offset + CHUNK]
                )

        reply = await self.bundles.UploadBundle(requests(), metadata=self.metadata)
        return str(reply.bundle.digest)

    async def assign(
        self,
        digest: str,
        *,
        selector: str | None = None,
        nodes: Sequence[str] = (),
        annotations: dict[str, str] | None = None,
        project: str = "default",
    ) -> tuple[int, float, float]:
        """Assign; returns (revision, wall time just before the call, wall time it returned)."""
        target = (
            bundle_pb2.Target(selector=selector)
            if selector is not None
            else bundle_pb2.Target(nodes=bundle_pb2.NodeList(node_ids=list(nodes)))
        )
        request = bundle_pb2.AssignBundleRequest(
            project=project, target=target, digest=digest, annotations=annotations or {}
        )
        t0 = time.time()
        reply = await self.bundles.AssignBundle(request, metadata=self.metadata)
        t1 = time.time()
        return int(reply.revision), t0, t1


# -- the server process -------------------------------------------------------------------

_PORT = re.compile(r"\(port (\d+)\)")
_METRICS = re.compile(r"metrics on http://[^:]+:(\d+)/metrics")


@dataclass
class ServerProcess:
    """`python -m controlplane serve` in its own process, optionally pinned to a core."""

    data_dir: Path
    database_url: str = ""
    cpus: str | None = SERVER_CPU
    extra_args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    metrics_port: int = 0

    @property
    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "controlplane",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            *self.extra_args,
        ]
        if "--workers" not in self.extra_args:
            # One process, as pinned and measured (by its pid) here.
            cmd += ["--workers", "1"]
        if self.database_url:
            cmd += ["--database-url", self.database_url]
        return pinned(cmd, self.cpus)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_path or self.data_dir / "server.log"
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            port, metrics = _PORT.search(text), _METRICS.search(text)
            if port and metrics:
                self.port, self.metrics_port = int(port.group(1)), int(metrics.group(1))
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"server did not start within {timeout} s; see {self.log_path}")

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def metrics(self) -> dict[str, float]:
        return scrape(self.metrics_port)


def scrape(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """Prometheus text format → {name{labels}: value} (comments skipped)."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def metric_sum(metrics: dict[str, float], name: str) -> float:
    """A metric summed over its label sets (`name` or `name{...}`)."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


async def wait_metric(
    server: ServerProcess, name: str, predicate: Any, within: float, interval: float = 0.5
) -> float:
    deadline = time.monotonic() + within
    value = metric_sum(server.metrics(), name)
    while not predicate(value) and time.monotonic() < deadline:
        await asyncio.sleep(interval)
        value = metric_sum(server.metrics(), name)
    return value


async def written_at(data_dir: Path, database_url: str, revisions: Sequence[int]) -> dict[int, float]:
    """The server's own `written_at` (wall clock, set inside the write transaction just
    before the commit) of each revision, read from the desired-state log."""
    if not revisions:
        return {}
    query = "SELECT revision, MIN(written_at) FROM desired_state_log WHERE revision IN ({}) GROUP BY revision"
    if not database_url:
        import sqlite3

        con = sqlite3.connect(f"file:{data_dir / 'controlplane.db'}?mode=ro", uri=True, timeout=30)
        try:
            rows = con.execute(query.format(",".join("?" * len(revisions))), list(revisions)).fetchall()
        finally:
            con.close()
        return {int(r): float(w) for r, w in rows}
    import asyncpg

    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        placeholders = ",".join(f"${i + 1}" for i in range(len(revisions)))
        records = await conn.fetch(query.format(placeholders), *revisions)
    finally:
        await conn.close()
    return {int(r[0]): float(r[1]) for r in records}


# -- reporting ---------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip("\n")
        except OSError:
            return ""

    lscpu = run("lscpu")
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model")), "")
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kb = next(int(ln.split()[1]) for ln in meminfo if ln.startswith("MemTotal"))
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": version("grpcio"),
        "protobuf": version("protobuf"),
        "uvloop": version("uvloop"),
        "pinned": can_pin(),
        "git_head": run("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"),
        # Server files that differ from HEAD when the run started (the tree is shared).
        "server_tree_dirty": run(
            "git", "-C", str(ROOT), "status", "--porcelain", "--", "controlplane"
        ).splitlines(),
    }


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """p50/p99/max (nearest rank) of `values`, or zeros when empty."""
    if not values:
        return {"n": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}
    s = sorted(values)

    def rank(q: float) -> float:
        return s[min(len(s) - 1, max(0, int(q * len(s) + 0.999999) - 1))]

    return {"n": len(s), "p50": rank(0.50), "p99": rank(0.99), "max": s[-1]}


def rotated(names: Sequence[str], rounds: int) -> Iterator[tuple[int, str]]:
    """(round, name) for `rounds` rounds over `names`, each round starting one further
    on, so no name always runs first (on a warm or a cold machine)."""
    for rnd in range(rounds):
        k = rnd % len(names)
        for name in [*names[k:], *names[:k]]:
            yield rnd, name


def result_name(bench: str, a: Any, run_id: str) -> str:
    """The result file of a run of `bench` (`a`: its parsed arguments, with nodes and tag)."""
    return f"{bench}-n{a.nodes}-{run_id}{'-' + a.tag if a.tag else ''}.json"


def write_json(name: str, data: dict[str, Any]) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    return path


def free_port() -> int:
    """A free loopback port for a benchmark's own processes (benchmarks run alone, not
    beside parallel test workers, so picking then binding is safe enough here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
