"""Fetch a bundle's archive to a local file while hashing it.

Memory stays at one chunk whatever the bundle size; the size limit is enforced as bytes
arrive (and up front when the server announces the size), and the digest is compared
once the last byte is on disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from agent_stub.errors import ApplyFailed, TransientFailure
from agent_stub.rpc import code_name, error_summary, retry_after
from agent_stub.verify import TrustedKey, key_id_of
from controlplane.api.bundle.v1 import bundle_pb2, bundle_pb2_grpc, signing_pb2, signing_pb2_grpc

# Errors that say the bytes will never come for this digest: a NACK, not a retry.
_PERMANENT = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    # The server's stored archive is damaged (it checks every download as it streams):
    # retrying gets the same bytes until an operator pushes the bundle again.
    grpc.StatusCode.DATA_LOSS,
}


class Downloader:
    def __init__(
        self,
        channel: Any,
        project: Callable[[], str],
        metadata: Callable[[], tuple[tuple[str, str], ...]],
        max_bytes: int,
        read_timeout: float,
        fsync: bool = True,
    ):
        self._stub = bundle_pb2_grpc.BundleServiceStub(channel)
        self._project = project
        self._metadata = metadata
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout
        self.fsync = fsync

    async def __call__(self, digest: str, dest: Path) -> int:
        """Write the archive of `digest` to `dest`; return its size.

        ApplyFailed: too large, digest mismatch, refused by the server for good.
        TransientFailure: the stream broke or stalled; try again after reconnecting.
        """
        expected = digest.removeprefix("sha256:")
        hasher = hashlib.sha256()
        size = 0
        call = self._stub.DownloadBundle(
            bundle_pb2.DownloadBundleRequest(project=self._project(), digest=digest),
            metadata=self._metadata(),
        )
        try:
            with dest.open("wb") as out:
                while True:
                    try:
                        async with asyncio.timeout(self.read_timeout):
                            message = await call.read()
                    except TimeoutError:
                        raise TransientFailure(
                            f"download of {digest} stalled: nothing for {self.read_timeout:g}s"
                        ) from None
                    if message is grpc.aio.EOF:
                        break
                    if message.size_bytes > self.max_bytes:
                        raise ApplyFailed(
                            f"bundle is {message.size_bytes} bytes, over this node's limit of "
                            f"{self.max_bytes} (--max-bundle-bytes)"
                        )
                    size += len(message.chunk)
                    if size > self.max_bytes:
                        raise ApplyFailed(
                            f"bundle exceeds this node's limit of {self.max_bytes} bytes (--max-bundle-bytes)"
                        )
                    hasher.update(message.chunk)
                    out.write(message.chunk)
                out.flush()
                if self.fsync:
                    os.fsync(out.fileno())
        except grpc.RpcError as e:
            code = e.code() if callable(getattr(e, "code", None)) else None
            if code in _PERMANENT:
                raise ApplyFailed(f"download refused by the server: {error_summary(e)}") from None
            hint = (
                retry_after(e.trailing_metadata())
                if callable(getattr(e, "trailing_metadata", None))
                else None
            )
            raise TransientFailure(
                f"download of {digest} failed: {error_summary(e)}", code=code_name(code), retry_after=hint
            ) from None
        finally:
            call.cancel()
        actual = hasher.hexdigest()
        if actual != expected:
            raise ApplyFailed(
                f"digest mismatch: expected sha256:{expected}, got sha256:{actual} ({size} bytes)"
            )
        return size


class KeyLister:
    """The control plane's signing keys (`ListSigningKeys`), for `verify.BundleVerifier`."""

    def __init__(
        self,
        channel: Any,
        project: Callable[[], str],
        metadata: Callable[[], tuple[tuple[str, str], ...]],
        timeout: float,
    ):
        self._stub = signing_pb2_grpc.SigningKeyServiceStub(channel)
        self._project = project
        self._metadata = metadata
        self.timeout = timeout

    async def __call__(self) -> list[TrustedKey]:
        try:
            reply = await self._stub.ListSigningKeys(
                signing_pb2.ListSigningKeysRequest(project=self._project()),
                metadata=self._metadata(),
                timeout=self.timeout,
            )
        except grpc.RpcError as e:
            raise TransientFailure(
                f"cannot list the control plane's signing keys: {error_summary(e)}"
            ) from None
        keys = []
        for key in reply.keys:
            # A listed key whose id is not its own hash is ignored, never trusted.
            if key_id_of(key.public_key) == key.key_id:
                keys.append(
                    TrustedKey(key.key_id, key.public_key, key.state == signing_pb2.SIGNING_KEY_STATE_RETIRED)
                )
        return keys
