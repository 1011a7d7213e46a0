"""Pushing bundles the way `controlplane bundle push` does: CreateBundle with files in
chunks, or a tar stream."""

from __future__ import annotations

import io
import tarfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from controlplane.api.bundle.v1 import bundle_pb2, bundle_pb2_grpc

CHUNK = 64 * 1024


def bundle_dir(parent: Path, files: Mapping[str, bytes | str]) -> Path:
    """`parent/tree` holding `files` (path → content), for the pipeline's in-process parts."""
    root = parent / "tree"
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return root


def file_messages(
    files: Mapping[str, bytes], chunk: int = CHUNK, executable: frozenset[str] = frozenset()
) -> list[bundle_pb2.CreateBundleRequest]:
    out = []
    for path, data in files.items():
        out.append(
            bundle_pb2.CreateBundleRequest(
                file=bundle_pb2.FileHeader(path=path, size_bytes=len(data), executable=path in executable)
            )
        )
        out.extend(
            bundle_pb2.CreateBundleRequest(chunk=data[i : i + chunk]) for i in range(0, len(data), chunk)
        )
    return out


async def create(
    stub: bundle_pb2_grpc.BundleServiceStub,
    files: Mapping[str, bytes] | None = None,
    project: str = "default",
    version: str = "",
    messages: list[bundle_pb2.CreateBundleRequest] | None = None,
    **call: Any,
) -> bundle_pb2.CreateBundleResponse:
    """CreateBundle with `files` (or raw `messages` after the header)."""
    body = messages if messages is not None else file_messages(files or {})

    async def requests() -> AsyncIterator[bundle_pb2.CreateBundleRequest]:
        yield bundle_pb2.CreateBundleRequest(
            header=bundle_pb2.CreateBundleHeader(project=project, version=version)
        )
        for message in body:
            yield message

    reply: bundle_pb2.CreateBundleResponse = await stub.CreateBundle(requests(), **call)
    return reply


def tar_of(files: Mapping[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mtime = 1_700_000_000
            info.mode = 0o640
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def tar_messages(data: bytes, chunk: int = CHUNK) -> list[bundle_pb2.CreateBundleRequest]:
    return [bundle_pb2.CreateBundleRequest(tar_chunk=data[i : i + chunk]) for i in range(0, len(data), chunk)]
