"""Getting a bundle's input off the wire and into a scratch tree, with bounded memory.

Two shapes of input: files (a `FileStart` then that many bytes, per file) and a tar
stream (staged to a temp file while counted, then read member by member). Both land in
a `TreeBuilder`, which refuses anything hostile; its refusals become INVALID_ARGUMENT
naming the field of the request at fault.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from controlplane.archives.limits import InvalidArchive
from controlplane.archives.tar_intake import read_tar
from controlplane.archives.tree import FileSink, TreeBuilder
from controlplane.blobs.staging import StagedUpload, UploadTooLarge
from controlplane.domain.errors import InvalidArgument


@dataclass(frozen=True)
class FileStart:
    """Starts the next file; `size_bytes` of chunks follow (none for a symlink)."""

    path: str
    size_bytes: int
    executable: bool = False
    symlink_target: str = ""


Part = FileStart | bytes


async def receive_files(tree: TreeBuilder, parts: AsyncIterator[Part], max_bytes: int) -> None:
    current: FileSink | None = None
    received = 0
    field = "file"
    try:
        async for part in parts:
            if isinstance(part, FileStart):
                field = "file"
                if current is not None:
                    current.close()
                    current = None
                if part.symlink_target:
                    if part.size_bytes:
                        raise InvalidArgument(
                            "a symlink carries no bytes: size_bytes must be 0", field="file.size_bytes"
                        )
                    tree.add_symlink(part.path, part.symlink_target)
                else:
                    current = tree.open_file(part.path, part.size_bytes, part.executable)
                continue
            field = "chunk"
            if not part:
                continue
            if current is None:
                raise InvalidArgument(
                    "bytes arrived before any file header (or after a symlink)", field="chunk"
                )
            received += len(part)
            if received > max_bytes:
                raise InvalidArgument(f"the files exceed {max_bytes} bytes", field="chunk")
            await asyncio.to_thread(current.write, part)
        if current is not None:
            current.close()
            current = None
    except InvalidArchive as e:
        raise InvalidArgument(str(e), field=field) from None
    finally:
        if current is not None:
            current.abort()


async def receive_tar(
    tree: TreeBuilder, chunks: AsyncIterator[bytes], scratch: Path, max_bytes: int, field: str
) -> None:
    """Stage the tar stream to disk (counting it), then read it into `tree`."""
    with StagedUpload(scratch, max_bytes) as staged:
        try:
            async for chunk in chunks:
                if chunk:
                    await asyncio.to_thread(staged.write, chunk)
        except UploadTooLarge as e:
            raise InvalidArgument(str(e), field=field) from None
        staged.finish()
        if staged.size == 0:
            raise InvalidArgument("the upload is empty", field=field)
        try:
            await asyncio.to_thread(read_tar, staged.path, tree)
        except InvalidArchive as e:
            raise InvalidArgument(str(e), field=field) from None
