"""The orchestrator's handle on the load-generator processes (bench/loadgen.py)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import procstat
from bench.common import CLIENT_CPU, pinned


class Workers:
    """W loadgen processes, each holding a slice of the nodes; JSON lines over pipes."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []
        self.slices: list[list[dict[str, str]]] = []
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._readers: list[asyncio.Task[None]] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def start(
        self,
        target: str,
        nodes: list[dict[str, str]],
        workers: int,
        channels: int,
        run_dir: Path,
        cpus: str | None = CLIENT_CPU,
        program: Sequence[str] = (sys.executable, "-m", "bench.loadgen"),
        extra_args: Callable[[int], list[str]] = lambda i: [],
    ) -> None:
        """`program` is bench/loadgen.py or the Go generator (bench/gobuild.py), which
        answer the same commands; `extra_args(i)` adds flags for worker i."""
        self.slices = [nodes[i::workers] for i in range(workers)]
        paths = _write_slices(run_dir, self.slices)
        for i, path in enumerate(paths):
            cmd = pinned(
                [
                    *program,
                    "--target",
                    target,
                    "--nodes-file",
                    str(path),
                    "--channels",
                    str(channels),
                    *extra_args(i),
                ],
                cpus,
            )
            with (run_dir / f"loadgen-{i}.log").open("wb") as err:
                proc = await asyncio.create_subprocess_exec(
                    *cmd,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=err,
                    limit=1 << 27,
                )
            self.procs.append(proc)
            self._readers.append(asyncio.get_running_loop().create_task(self._read(proc)))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                break
            reply = json.loads(line)
            fut = self._waiting.pop(reply.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result(reply)
        for fut in list(self._waiting.values()):
            if not fut.done():
                fut.set_exception(RuntimeError(f"loadgen {proc.pid} exited"))

    async def call(self, i: int, cmd: str, **args: Any) -> dict[str, Any]:
        proc = self.procs[i]
        assert proc.stdin is not None
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        proc.stdin.write((json.dumps({"id": rid, "cmd": cmd, **args}) + "\n").encode())
        await proc.stdin.drain()
        reply = await fut
        if "error" in reply:
            raise RuntimeError(f"loadgen {i}: {cmd}: {reply['error']}")
        return reply

    async def all(self, cmd: str, **args: Any) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self.call(i, cmd, **args) for i in range(len(self.procs)))))

    async def receipts(self, revs: list[int]) -> dict[int, list[float]]:
        """When each stream received each of `revs` (wall-clock times), over every worker."""
        out: dict[int, list[float]] = {}
        for rep in await self.all("receipts", revs=revs):
            for rev, times in rep["receipts"].items():
                out.setdefault(int(rev), []).extend(times)
        return out

    def cpu(self) -> float:
        return procstat.cpu_of(self.pids)

    def rss(self) -> int:
        return sum(procstat.rss_bytes(p) for p in self.pids)

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None and proc.stdin is not None:
                proc.stdin.write(b'{"cmd": "quit"}\n')
                with contextlib.suppress(ConnectionError):
                    await proc.stdin.drain()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for t in self._readers:
            t.cancel()


def _write_slices(run_dir: Path, slices: list[list[dict[str, str]]]) -> list[Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, part in enumerate(slices):
        path = run_dir / f"nodes-{i}.json"
        path.write_text(json.dumps(part))
        paths.append(path)
    return paths


def merge_open(reports: list[dict[str, Any]], t_ref: float) -> dict[str, Any]:
    """Combine the workers' answers to open/storm: counts, and times relative to `t_ref`."""
    ready_times = [t for r in reports for t in r["ready_times"]]
    out: dict[str, Any] = {
        "n": sum(r["n"] for r in reports),
        "ready": sum(r["ready"] for r in reports),
        "pending": sum(r["pending"] for r in reports),
        "failed": _sum_dicts(r["failed"] for r in reports),
        "errors": _sum_dicts(r["errors"] for r in reports),
        "drops": _sum_dicts(r["drops"] for r in reports),
        "modes": _sum_dicts(r["modes"] for r in reports),
        "retries": sum(r["retries"] for r in reports),
        "messages": sum(r["messages"] for r in reports),
        "all_ready_s": (max(ready_times) - t_ref) if ready_times else None,
        "ready_after": sorted(t - t_ref for t in ready_times),
        "answered_after_s": max(r["t_end"] for r in reports) - t_ref,
        "failed_after": sorted(t + r["t_start"] - t_ref for r in reports for t in r.get("failed_after", [])),
        "details": _sum_dicts(r.get("details", {}) for r in reports),
    }
    return out


def _sum_dicts(dicts: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    return total


def now() -> float:
    return time.time()
