"""A private etcd (Debian's `etcd-server`, single member) for the benchmark.

Started on free loopback ports in a fresh temporary data directory with etcd's default
flags otherwise, stopped by its pid, its directory removed. Never the system service.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from bench.common import free_port, pinned
from bench.etcdapi import EtcdApi


class EtcdProcess:
    def __init__(
        self,
        api: EtcdApi,
        binary: str = "etcd",
        cpus: str | None = None,
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
    ):
        self.api = api
        self.binary = shutil.which(binary) or binary
        self.cpus = cpus
        self.extra_args = list(extra_args)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.data_dir: Path | None = None
        self.port = 0
        self.command: list[str] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def version(self) -> str:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True, check=False)
        return out.stdout.splitlines()[0] if out.stdout else "?"

    def _spawn(self) -> Path:
        if not os.path.exists(self.binary):
            raise SystemExit(f"etcd not found ({self.binary}): install Debian's etcd-server")
        self.data_dir = Path(tempfile.mkdtemp(prefix="bench-etcd-"))
        self.port, peer = free_port(), free_port()
        client_url, peer_url = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{peer}"
        self.command = pinned(
            [
                self.binary,
                "--name=bench",
                f"--data-dir={self.data_dir / 'data'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=bench={peer_url}",
                "--logger=zap",
                "--log-level=warn",
                *self.extra_args,
            ],
            self.cpus,
        )
        log_path = self.log_path or self.data_dir / "etcd.log"
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        return log_path

    async def start(self, within: float = 30.0) -> None:
        """Start etcd and return once it answers Maintenance.Status."""
        log_path = await asyncio.to_thread(self._spawn)
        assert self.proc is not None
        deadline = time.monotonic() + within
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = self.api.grpc.MaintenanceStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {log_path}")
                try:
                    await stub.Status(self.api.rpc.StatusRequest(), timeout=1.0)
                    return
                except grpc.aio.AioRpcError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise TimeoutError(f"etcd did not answer within {within} s; see {log_path}") from None
                    await asyncio.sleep(0.1)

    def stop(self, timeout: float = 20.0) -> int | None:
        code: int | None = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            code = self.proc.returncode
        if self.data_dir is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.data_dir)
        return code
