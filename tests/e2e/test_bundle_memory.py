"""A 100 MiB bundle goes up and comes down with bounded memory.

Peak resident memory (VmHWM, reset through /proc/<pid>/clear_refs before each phase) of
the real server and agent processes must grow far less than the bundle's size: every
stage streams (upload → scratch files → packer → blob store → download → agent's file
→ unpack). A memory measurement, not a timing one.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controlplane.api.bundle.v1 import bundle_pb2
from tests.e2e.conftest import AgentFactory
from tests.support.processes import ControlClient, ServerProcess

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024
SIZE = 100 * MIB
# Far below the bundle: a few chunks in flight, zstd's window, the interpreter's churn.
MAX_GROWTH = 48 * MIB


def _status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def reset_peak(pid: int) -> int:
    """Start a new peak measurement; returns the resident size now."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status(pid)["VmRSS"]


def peak(pid: int) -> int:
    return _status(pid)["VmHWM"]


def make_files(root: Path) -> dict[str, int]:
    """100 MiB of incompressible data in four files plus a small config."""
    sizes = {}
    root.mkdir(parents=True)
    (root / "main.kdl").write_bytes(b'listen "8080"\n')
    sizes["main.kdl"] = 14
    for i in range(4):
        path = root / f"data/blob{i}.bin"
        path.parent.mkdir(exist_ok=True)
        with path.open("wb") as f:
            for _ in range(SIZE // 4 // MIB):
                f.write(os.urandom(MIB))
        sizes[f"data/blob{i}.bin"] = SIZE // 4
    return sizes


async def requests(root: Path, sizes: dict[str, int]) -> AsyncIterator[bundle_pb2.CreateBundleRequest]:
    yield bundle_pb2.CreateBundleRequest(
        header=bundle_pb2.CreateBundleHeader(project="default", version="big")
    )
    for name, size in sizes.items():
        yield bundle_pb2.CreateBundleRequest(file=bundle_pb2.FileHeader(path=name, size_bytes=size))
        with (root / name).open("rb") as f:
            while chunk := await asyncio.to_thread(f.read, MIB):
                yield bundle_pb2.CreateBundleRequest(chunk=chunk)


async def test_hundred_mib_bundle_with_bounded_memory(
    server: ServerProcess, control: ControlClient, spawn_agent: AgentFactory, tmp_path: Path
) -> None:
    sizes = await asyncio.to_thread(make_files, tmp_path / "big")
    assert server.proc is not None
    server_pid = server.proc.pid
    agent = spawn_agent("edge-1", {"env": "prod"})
    node_id = await agent.wait_registered()
    await control.wait_node(node_id, lambda n: n.HasField("last_heartbeat"), what="agent up")

    before = reset_peak(server_pid)
    reply = await control.bundles.CreateBundle(
        requests(tmp_path / "big", sizes), metadata=control.metadata, timeout=300
    )
    upload_growth = peak(server_pid) - before
    bundle = reply.bundle
    assert bundle.state == bundle_pb2.BUNDLE_STATE_VALID, bundle.state_reason
    assert bundle.size_bytes > SIZE and bundle.total_bytes == sum(sizes.values())

    assert agent.proc is not None
    agent_before = reset_peak(agent.proc.pid)
    before = reset_peak(server_pid)
    await control.assign(bundle.digest, nodes=[node_id])
    await agent.wait_current(bundle.digest, timeout=240)
    download_growth = peak(server_pid) - before
    agent_growth = peak(agent.proc.pid) - agent_before

    print(
        f"peak RSS growth: server upload {upload_growth / MIB:.1f} MiB, "
        f"server download {download_growth / MIB:.1f} MiB, agent {agent_growth / MIB:.1f} MiB "
        f"(bundle {bundle.size_bytes / MIB:.1f} MiB)"
    )
    assert upload_growth < MAX_GROWTH
    assert download_growth < MAX_GROWTH
    assert agent_growth < MAX_GROWTH
    applied = agent.current()
    assert applied is not None and (applied / "data/blob3.bin").stat().st_size == SIZE // 4
