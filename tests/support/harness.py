"""An in-process control plane on a free port, with typed clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from controlplane.api.bundle.v1 import bundle_pb2, bundle_pb2_grpc
from controlplane.api.node.v1 import node_pb2, node_pb2_grpc
from controlplane.api.project.v1 import project_pb2_grpc
from controlplane.api.watch.v1 import watch_pb2, watch_pb2_grpc
from controlplane.bootstrap import App

CHUNK = 1024 * 1024


def auth(credential: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {credential}"),)


@dataclass
class Registered:
    node_id: str
    credential: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return auth(self.credential)


@dataclass
class Harness:
    app: App
    address: str
    token: str
    channel: grpc.aio.Channel = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.aio.insecure_channel(self.address)
        self.nodes = node_pb2_grpc.NodeServiceStub(self.channel)
        self.watch = watch_pb2_grpc.WatchServiceStub(self.channel)
        self.bundles = bundle_pb2_grpc.BundleServiceStub(self.channel)
        self.projects = project_pb2_grpc.ProjectServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def register(
        self,
        name: str,
        labels: dict[str, str] | None = None,
        project: str = "default",
        token: str | None = None,
    ) -> Registered:
        reply = await self.nodes.RegisterNode(
            node_pb2.RegisterNodeRequest(
                project=project, enrollment_token=token or self.token, name=name, labels=labels or {}
            )
        )
        return Registered(reply.node_id, reply.node_credential)

    async def upload(self, archive: bytes, project: str = "default", version: str = "") -> str:
        async def requests() -> AsyncIterator[bundle_pb2.UploadBundleRequest]:
            header = bundle_pb2.UploadBundleHeader(project=project, version=version)
            for offset in range(0, max(len(archive), 1), CHUNK):
                first = offset == 0
                yield bundle_pb2.UploadBundleRequest(
                    header=header if first else None, chunk=archive[offset : offset + CHUNK]
                )

        reply = await self.bundles.UploadBundle(requests())
        return reply.bundle.digest

    async def assign(
        self,
        digest: str,
        selector: str | None = None,
        nodes: Sequence[str] = (),
        project: str = "default",
        **kwargs: Any,
    ) -> int:
        target = (
            bundle_pb2.Target(selector=selector)
            if selector is not None
            else bundle_pb2.Target(nodes=bundle_pb2.NodeList(node_ids=list(nodes)))
        )
        reply = await self.bundles.AssignBundle(
            bundle_pb2.AssignBundleRequest(project=project, target=target, digest=digest, **kwargs)
        )
        return reply.revision

    def open_watch(self, node: Registered, since: int = 0, epoch: str = "") -> Recorder:
        call = self.watch.WatchBundles(
            watch_pb2.WatchBundlesRequest(node_id=node.node_id, since_revision=since, epoch=epoch),
            metadata=node.metadata,
        )
        return Recorder(call)


class Recorder:
    """Reads a WatchBundles stream in the background and keeps every event in order."""

    def __init__(self, call: Any):
        self.call = call
        self.events: list[watch_pb2.WatchEvent] = []
        self.messages = 0
        self.error: grpc.RpcError | None = None
        self.ended = asyncio.Event()
        self._changed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for response in self.call:
                self.messages += 1
                self.events.extend(response.events)
                self._changed.set()
        except grpc.RpcError as e:
            self.error = e
        finally:
            self.ended.set()
            self._changed.set()

    def of(self, kind: str) -> list[Any]:
        return [getattr(e, kind) for e in self.events if e.WhichOneof("event") == kind]

    @property
    def kinds(self) -> list[str]:
        return [str(e.WhichOneof("event")) for e in self.events]

    @property
    def stream_id(self) -> str:
        return self.of("started")[0].stream_id

    @property
    def epoch(self) -> str:
        return self.of("started")[0].epoch

    def last_revision(self) -> int:
        """The cursor a node would hold after applying everything received."""
        revision = 0
        for event in self.events:
            kind = event.WhichOneof("event")
            if kind in ("desired", "snapshot_end", "bookmark"):
                revision = max(revision, getattr(event, kind).revision)
        return revision

    async def wait_for(self, predicate: Any, timeout: float = 10.0, what: str = "event") -> None:
        async def loop() -> None:
            while not predicate(self):
                if self.ended.is_set():
                    raise AssertionError(f"stream ended ({self.error}) before {what}; got {self.kinds}")
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(loop(), timeout)
        except TimeoutError:
            raise AssertionError(f"no {what} within {timeout}s; got {self.kinds}") from None

    async def wait_digest(self, digest: str, timeout: float = 10.0) -> watch_pb2.DesiredState:
        await self.wait_for(
            lambda r: any(d.digest == digest for d in r.of("desired")), timeout, f"digest {digest}"
        )
        return next(d for d in reversed(self.of("desired")) if d.digest == digest)

    async def cancel(self) -> None:
        self.call.cancel()
        await self.ended.wait()
