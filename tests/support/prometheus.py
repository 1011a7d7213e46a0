"""A real Prometheus (Debian's `/usr/bin/prometheus`) for tests, and scrape targets.

`PrometheusProcess` runs its own server on a free loopback port with its own config and
data directory, discovering targets through the control plane's HTTP service discovery,
and is stopped by its pid. Prometheus 2.42 hands discovered targets to its scrapers on
a fixed 5 s tick (the discovery manager's and the scrape manager's), so a started server
scrapes its first targets about 5 s in: tests share one where they can.

`MetricTargets` serves one `/metrics` page per port (one per simulated node) whose
values a callback decides, so a node's series follow the bundle it runs.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.support.ports import unused_port

BINARY = "/usr/bin/prometheus"


class PrometheusProcess:
    def __init__(self, workdir: Path, sd_url: str, api_key: str, scrape_interval: str = "1s"):
        self.workdir = workdir
        self.port = unused_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.sd_url = sd_url
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "key").write_text(api_key)
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "scrape_configs": [
                {
                    "job_name": "nodes",
                    "http_sd_configs": [
                        {
                            "url": sd_url,
                            "refresh_interval": "1s",
                            "authorization": {"type": "Bearer", "credentials_file": str(workdir / "key")},
                        }
                    ],
                }
            ],
        }
        # JSON is YAML: Prometheus reads it as is.
        (workdir / "prometheus.yml").write_text(json.dumps(config))

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def start(self, timeout: float = 30.0) -> None:
        """Start it and wait until it is ready; on another free port while the one chosen
        was taken meanwhile (by another process: it had to be chosen before binding)."""
        for attempt in range(3):
            try:
                return await self._start(timeout)
            except _PortTaken:
                if attempt == 2:
                    raise
                self.port = unused_port()
                self.url = f"http://127.0.0.1:{self.port}"

    async def _start(self, timeout: float) -> None:
        log = (self.workdir / "prometheus.log").open("wb")
        self.process = subprocess.Popen(  # noqa: ASYNC220 - starts at once, nothing to await
            [
                BINARY,
                f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = asyncio.get_running_loop().time() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                if self.process.poll() is not None:
                    if "address already in use" in self.log():
                        raise _PortTaken(self.log()[-2000:])
                    raise RuntimeError(f"prometheus exited {self.process.returncode}: {self.log()[-2000:]}")
                try:
                    async with session.get(f"{self.url}/-/ready") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"prometheus not ready after {timeout}s: {self.log()[-2000:]}")
                await asyncio.sleep(0.1)

    def log(self) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            body = await response.json()
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def stop(self) -> None:
        """Stop it by its pid (terminate, then kill if it lingers)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 10)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait, 10)


class _PortTaken(RuntimeError):
    """Prometheus exited: its listen port was taken."""


class MetricTargets:
    """One loopback HTTP server per target, each serving `/metrics` in Prometheus's text
    format: `values(index)` gives the metric name → value map of target `index` now."""

    def __init__(self, count: int, values: Callable[[int], dict[str, float]]):
        self.count = count
        self.values = values
        self.ports: list[int] = []
        self._runners: list[web.AppRunner] = []

    async def start(self) -> None:
        for index in range(self.count):
            app = web.Application()
            app.router.add_get("/metrics", self._handler(index))
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            self._runners.append(runner)
            self.ports.append(int(runner.addresses[0][1]))

    def _handler(self, index: int) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.Response:
            lines = [f"{name} {value}" for name, value in sorted(self.values(index).items())]
            return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

        return handle

    def target(self, index: int) -> str:
        return f"127.0.0.1:{self.ports[index]}"

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners = []
