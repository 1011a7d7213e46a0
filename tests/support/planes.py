"""In-process control planes a test starts on URLs of its own choosing (a cluster's
primary, its standby, both), stopped at the test's end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from controlplane.bootstrap import App
from tests.conftest import fast_settings
from tests.support.harness import Harness


class Planes:
    """In-process control planes started by a test, stopped at its end."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.started: list[Harness] = []

    async def start(self, url: str, data: str = "data", **overrides: Any) -> Harness:
        """A control plane on `url`, its state (keys, tokens) in `data` under tmp_path:
        planes sharing `data` are replicas of one deployment."""
        settings = fast_settings(self.tmp_path, url, data_dir=self.tmp_path / data, **overrides)
        app = App(settings)
        info = await app.start()
        token = info.enrollment_token or (settings.data_dir / "enrollment-token").read_text().strip()
        harness = Harness(app, f"127.0.0.1:{info.port}", token)
        self.started.append(harness)
        return harness

    async def stop(self, harness: Harness) -> None:
        self.started.remove(harness)
        await harness.close()
        await harness.app.stop()

    async def close(self) -> None:
        for harness in list(self.started):
            await self.stop(harness)
