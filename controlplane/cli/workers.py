"""`serve --workers N`: one parent, N serving processes sharing the listening port.

The parent does the first-start work once (data directory, migrations, keys, the default
project: `bootstrap.first_start`), reserves the port, then spawns the workers (a fresh
interpreter each, never a fork of a process that imported grpc) and supervises them: a
worker that dies is started again in its slot, and SIGTERM or SIGINT stops them all, each
draining its streams with a closing bookmark as a single server does.

- The shared port: the parent binds it with SO_REUSEPORT without listening (so port 0
  becomes a real port, and no other program takes it while a worker restarts); the
  workers bind it with SO_REUSEPORT and listen, and the kernel spreads connections
  among them. The parent never accepts a connection.
- Each worker also listens on a private address of its own (127.0.0.1, a free port) for
  its own health, and serves its own metrics on another; `workers.json` in the data
  directory lists them, by slot.
- Metrics: the workers write prometheus_client's multiprocess files in a directory the
  parent made; the parent serves `--metrics-listen` from all of them (counters summed,
  gauges as each declares), and the fleet gauges from whichever worker exports them.
- Background jobs run under leases whose holders are `<replica>/<slot>#<incarnation>`:
  one process per lease, as across replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from prometheus_client import CollectorRegistry, disable_created_metrics, multiprocess, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from controlplane.bootstrap import METRICS_OPTION, App, FirstStart, first_start
from controlplane.config import Settings
from controlplane.rpc.server import LISTEN_OPTION, ListenError
from controlplane.store.peers import create_heads

log = logging.getLogger(__name__)

WORKERS_FILE = "workers.json"
# The fleet gauges (tasks/fleet_metrics.py) are a collector of the lease holder's, not
# multiprocess files: the parent takes them from the worker that exports them.
FLEET_FAMILIES = ("controlplane_fleet_nodes", "controlplane_rollouts", "controlplane_drift_episodes_open")
# A worker that keeps dying is started again no faster than this (doubling from 0.5 s).
_MAX_BACKOFF = 10.0
_PR_SET_PDEATHSIG = 1


def cpu_count() -> int:
    """The cores this process may run on (`--workers auto`)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def reserve(listen: str) -> tuple[list[socket.socket], int]:
    """Bind `listen` with SO_REUSEPORT, without listening: port 0 becomes a real port the
    workers then share. Every address the host resolves to is bound on the same port."""
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    infos = socket.getaddrinfo(host, int(port_text), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    held: list[socket.socket] = []
    port = int(port_text)
    try:
        for family, kind, proto, _name, address in infos:
            sock = socket.socket(family, kind, proto)
            held.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address[0], port, *address[2:]))
            port = sock.getsockname()[1]
    except OSError as e:
        for sock in held:
            sock.close()
        raise ListenError("listen", listen, LISTEN_OPTION, (e.strerror or str(e)).lower()) from None
    return held, port


@dataclass
class Ready:
    """What `serve` prints once every worker serves."""

    port: int
    metrics_port: int
    first: FirstStart


@dataclass
class _Slot:
    index: int
    settings: Settings
    process: BaseProcess | None = None
    pipe: Connection | None = None
    started_at: float = 0.0
    backoff: float = 0.5
    address: str = ""
    metrics_port: int = 0


class Supervisor:
    def __init__(self, settings: Settings, count: int, telemetry: dict[str, Any], log_level: str):
        self.settings = settings
        self.count = count
        self._telemetry = telemetry
        self._log_level = log_level
        self._context = multiprocessing.get_context("spawn")
        self._slots: list[_Slot] = []
        self._reserved: list[socket.socket] = []
        self._metrics_dir = ""
        self._metrics_server: Any = None
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()

    # -- starting ------------------------------------------------------------------------

    def start(self) -> Ready:
        s = self.settings
        # From now on SIGTERM and SIGINT stop the workers (at once if they come before
        # every worker serves): never a parent gone with its workers half started.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._signalled)
        first = asyncio.run(first_start(s))
        self._reserved, port = reserve(s.listen)
        create_heads(s.data_dir, self.count)
        self._metrics_dir = tempfile.mkdtemp(prefix="controlplane-metrics-")
        # Read by prometheus_client when a worker imports it: each writes its own files.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
        metrics_port = self._start_metrics()
        host = s.listen.rpartition(":")[0]
        for index in range(self.count):
            worker = replace(
                s,
                listen=f"{host}:{port}",
                private_listen="127.0.0.1:0",
                metrics_listen="127.0.0.1:0" if s.metrics_listen else "",
                process_index=index,
                workers=self.count,
                # One process serves Prometheus's service discovery (any could).
                http_sd_listen=s.http_sd_listen if index == 0 else "",
            )
            self._slots.append(_Slot(index, worker))
        for slot in self._slots:
            self._spawn(slot)
        for slot in self._slots:
            try:
                self._await_ready(slot)
            except WorkerFailed:
                self.stop()
                raise
        self._write_table()
        return Ready(port, metrics_port, first)

    def _spawn(self, slot: _Slot) -> None:
        ours, theirs = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_worker_main,
            args=(slot.settings, self._telemetry, self._log_level, theirs, os.getpid()),
            name=f"controlplane-worker-{slot.index}",
        )
        process.start()
        theirs.close()
        slot.process, slot.pipe, slot.started_at = process, ours, time.monotonic()

    def _await_ready(self, slot: _Slot) -> None:
        """Wait for a worker's first word: where it serves, or why it could not."""
        assert slot.pipe is not None and slot.process is not None
        try:
            message = slot.pipe.recv()
        except EOFError:
            slot.process.join(1.0)
            message = ("error", f"worker {slot.index} exited with code {slot.process.exitcode}")
        finally:
            slot.pipe.close()
            slot.pipe = None
        if message[0] == "error":
            raise WorkerFailed(str(message[1]))
        _, private_port, metrics_port = message
        slot.address = f"127.0.0.1:{private_port}"
        slot.metrics_port = metrics_port
        log.info(
            "worker %d (pid %d) serves; its own address %s, its metrics %s",
            slot.index,
            slot.process.pid,
            slot.address,
            f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else "off",
        )

    def _write_table(self) -> None:
        """`workers.json`: each worker's pid and private addresses, by slot."""
        table = [
            {
                "index": slot.index,
                "pid": slot.process.pid if slot.process is not None else 0,
                "address": slot.address,
                "metrics": f"http://127.0.0.1:{slot.metrics_port}/metrics" if slot.metrics_port else "",
            }
            for slot in self._slots
        ]
        path = self.settings.data_dir / WORKERS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"parent": os.getpid(), "workers": table}, indent=2) + "\n")
        tmp.replace(path)

    def _start_metrics(self) -> int:
        listen = self.settings.metrics_listen
        if not listen:
            return 0
        host, _, port = listen.rpartition(":")
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self._metrics_dir)  # type: ignore[no-untyped-call]
        registry.register(_FleetFromWorkers(self))
        disable_created_metrics()  # type: ignore[no-untyped-call]
        try:
            self._metrics_server, _thread = start_http_server(
                int(port), addr=host or "0.0.0.0", registry=registry
            )
        except (OSError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ListenError("serve metrics", listen, METRICS_OPTION, reason.lower()) from e
        return int(self._metrics_server.server_port)

    # -- supervising ---------------------------------------------------------------------

    def wait(self) -> None:
        """Until SIGTERM or SIGINT: restart workers that die."""
        while not self._stopping:
            sentinels: dict[int, _Slot] = {
                slot.process.sentinel: slot for slot in self._slots if slot.process is not None
            }
            ready = multiprocessing.connection.wait([*sentinels, self._wake_r])
            if self._stopping:
                break
            for item in ready:
                slot = sentinels.get(item) if isinstance(item, int) else None
                if slot is not None:
                    self._restart(slot)

    def _signalled(self, _signum: int, _frame: Any) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _restart(self, slot: _Slot) -> None:
        assert slot.process is not None
        process = slot.process
        process.join()
        if process.pid is not None:
            # Its live gauges leave the aggregate; its counters stay in the sums.
            multiprocess.mark_process_dead(process.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
        quick = time.monotonic() - slot.started_at < 10.0
        slot.backoff = min(slot.backoff * 2, _MAX_BACKOFF) if quick else 0.5
        log.warning(
            "worker %d (pid %s) exited with code %s; starting it again in %.1f s",
            slot.index,
            process.pid,
            process.exitcode,
            slot.backoff,
        )
        deadline = time.monotonic() + slot.backoff
        while not self._stopping and (left := deadline - time.monotonic()) > 0:
            multiprocessing.connection.wait([self._wake_r], timeout=left)
        if self._stopping:
            slot.process = None
            return
        self._spawn(slot)
        try:
            self._await_ready(slot)
        except WorkerFailed as e:
            # Its sentinel fires at once: the next round starts it again, later.
            log.warning("worker %d did not start: %s", slot.index, e)
            return
        self._write_table()

    # -- stopping ------------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM every worker (each drains its streams), wait, then release everything."""
        self._stopping = True
        for slot in self._slots:
            if slot.process is not None and slot.process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.process.pid or 0, signal.SIGTERM)
        grace = self.settings.shutdown_grace * 3 + 5
        deadline = time.monotonic() + grace
        for slot in self._slots:
            if slot.process is None:
                continue
            slot.process.join(max(0.0, deadline - time.monotonic()))
            if slot.process.is_alive():
                log.warning("worker %d did not stop within %.0f s: killing it", slot.index, grace)
                slot.process.kill()
                slot.process.join()
        for sock in self._reserved:
            sock.close()
        self._reserved = []
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        if self._metrics_dir:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            self._metrics_dir = ""
        with contextlib.suppress(FileNotFoundError):
            (self.settings.data_dir / WORKERS_FILE).unlink()

    def metrics_urls(self) -> Iterator[str]:
        for slot in self._slots:
            if slot.metrics_port and slot.process is not None and slot.process.is_alive():
                yield f"http://127.0.0.1:{slot.metrics_port}/metrics"


class WorkerFailed(RuntimeError):
    """A worker could not start (its own error's message)."""


class _FleetFromWorkers(Collector):
    """The fleet gauges of whichever worker holds their lease (one at most)."""

    def __init__(self, supervisor: Supervisor):
        self._supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        for url in self._supervisor.metrics_urls():
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    text = response.read().decode()
            except OSError:
                continue
            found = [
                family
                for family in text_string_to_metric_families(text)
                if family.name in FLEET_FAMILIES and family.samples
            ]
            if found:
                yield from found
                return


# -- the worker's side -----------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """A worker must not outlive its parent (a SIGKILLed server must leave no process
    serving its port): the kernel kills it when the parent dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _worker_main(
    settings: Settings, telemetry: dict[str, Any], log_level: str, pipe: Connection, parent: int
) -> None:
    _die_with_parent(parent)
    # The parent forwards SIGTERM; a terminal's Ctrl-C reaches every process of the group.
    from controlplane.cli.telemetry_options import setup as telemetry_setup

    traces = telemetry_setup(dict(telemetry), log_level)
    try:
        try:
            import uvloop

            uvloop.run(_serve(settings, pipe))
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            asyncio.run(_serve(settings, pipe))
    finally:
        traces.shutdown()


async def _serve(settings: Settings, pipe: Connection) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    app = App(settings)
    try:
        info = await app.start()
    except Exception as e:
        pipe.send(("error", str(e)))
        log.exception("worker %d could not start", settings.process_index)
        sys.exit(1)
    pipe.send(("ready", info.private_port, info.metrics_port))
    pipe.close()
    await stop.wait()
    await app.stop()
