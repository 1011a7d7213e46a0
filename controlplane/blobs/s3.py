"""Blobs in an S3 bucket (or anything speaking its API) through aiobotocore.

Keys are `<prefix>sha256/ab/<hex>`. Credentials and region come from the settings when
given, otherwise from botocore's standard chain (AWS_ACCESS_KEY_ID, AWS_PROFILE,
instance roles, ...). Uploads above one part go up as a multipart upload read from
the staged file one part at a time, downloads stream the body in chunks: memory stays
bounded whatever the bundle size.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from controlplane.blobs.base import DigestCheck, blob_key, reported
from controlplane.domain.ports import CHUNK_BYTES, BlobMissing

# S3's minimum part size is 5 MiB; 16 MiB keeps a 1 GiB bundle under 64 parts while one
# part in memory stays small.
PART_BYTES = 16 * 1024 * 1024
_MISSING = {"404", "NoSuchKey", "NotFound"}
# An endpoint that is down is a push or download refused UNAVAILABLE within seconds, not
# minutes: botocore's defaults (60 s to connect, 60 s per read) times its attempts would
# hold a caller for up to 5 minutes before saying so. Standard-mode retries back off
# 0-1, 0-2, 0-4 s between the 4 attempts, riding out a throttle or a blip.
RETRY_ATTEMPTS = 4
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
# What botocore raises for S3's refusals (AccessDenied, NoSuchBucket, 5xx after its
# retries) and for an endpoint it cannot reach or that stops answering; OSError for the
# staged file.
_FAILURES = (ClientError, BotoCoreError, OSError)


@dataclass(frozen=True)
class S3Settings:
    bucket: str
    prefix: str = ""
    endpoint_url: str = ""
    region: str = ""
    access_key_id: str = ""
    secret_access_key: str = ""

    @classmethod
    def from_url(cls, url: str, **options: str) -> S3Settings:
        """`s3://bucket/some/prefix` plus endpoint, region, credentials."""
        if not url.startswith("s3://"):
            raise ValueError(f"{url!r} is not an s3://bucket[/prefix] URL")
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"{url!r} names no bucket")
        prefix = prefix.strip("/")
        return cls(bucket=bucket, prefix=f"{prefix}/" if prefix else "", **options)


class S3BlobStore:
    def __init__(self, settings: S3Settings):
        self.settings = settings
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    async def start(self) -> None:
        s = self.settings
        options: dict[str, Any] = {
            "config": AioConfig(
                retries={"max_attempts": RETRY_ATTEMPTS, "mode": "standard"},
                connect_timeout=CONNECT_TIMEOUT,
                read_timeout=READ_TIMEOUT,
                max_pool_connections=32,
            )
        }
        if s.endpoint_url:
            options["endpoint_url"] = s.endpoint_url
        if s.region:
            options["region_name"] = s.region
        if s.access_key_id:
            options["aws_access_key_id"] = s.access_key_id
            options["aws_secret_access_key"] = s.secret_access_key
        self._client = await self._stack.enter_async_context(get_session().create_client("s3", **options))

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None

    def key(self, digest: str) -> str:
        return self.settings.prefix + blob_key(digest)

    async def put_file(self, digest: str, path: Path) -> None:
        with reported(_FAILURES, _reason):
            await self._put(digest, path)

    async def _put(self, digest: str, path: Path) -> None:
        # Always written, even if present: it refreshes the object's age for GC.
        size = (await asyncio.to_thread(path.stat)).st_size
        bucket, key = self.settings.bucket, self.key(digest)
        check = DigestCheck(digest)
        if size <= PART_BYTES:
            body = check.update(await asyncio.to_thread(path.read_bytes))
            check.verify()
            await self._client.put_object(Bucket=bucket, Key=key, Body=body)
            return
        upload = await self._client.create_multipart_upload(Bucket=bucket, Key=key)
        upload_id = upload["UploadId"]
        parts = []
        try:
            with path.open("rb") as f:
                number = 1
                while data := await asyncio.to_thread(f.read, PART_BYTES):
                    part = await self._client.upload_part(
                        Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=check.update(data)
                    )
                    parts.append({"PartNumber": number, "ETag": part["ETag"]})
                    number += 1
            # Completing is what makes the object appear: only for the right bytes.
            check.verify()
            await self._client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await self._client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            raise

    async def read(self, digest: str, chunk_bytes: int = CHUNK_BYTES) -> AsyncGenerator[bytes]:
        with reported(_FAILURES, _reason):
            try:
                response = await self._client.get_object(Bucket=self.settings.bucket, Key=self.key(digest))
            except ClientError as e:
                if _code(e) in _MISSING:
                    raise BlobMissing(digest) from None
                raise
            async with response["Body"] as body:
                while chunk := await body.read(chunk_bytes):
                    yield chunk

    async def exists(self, digest: str) -> bool:
        with reported(_FAILURES, _reason):
            try:
                await self._client.head_object(Bucket=self.settings.bucket, Key=self.key(digest))
            except ClientError as e:
                if _code(e) in _MISSING:
                    return False
                raise
            return True

    async def delete(self, digest: str) -> None:
        with reported(_FAILURES, _reason):
            await self._client.delete_object(Bucket=self.settings.bucket, Key=self.key(digest))

    async def list(self) -> AsyncIterator[tuple[str, datetime]]:
        root = self.settings.prefix
        with reported(_FAILURES, _reason):
            paginator = self._client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.settings.bucket, Prefix=root):
                for item in page.get("Contents", ()):
                    parts = item["Key"].removeprefix(root).split("/")
                    if len(parts) == 3 and len(parts[2]) == 64:
                        modified = item["LastModified"]
                        if modified.tzinfo is None:
                            modified = modified.replace(tzinfo=UTC)
                        yield f"{parts[0]}:{parts[2]}", modified


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _reason(error: BaseException) -> str:
    """S3's error code (AccessDenied, NoSuchBucket, SlowDown, ...); botocore's own
    errors (EndpointConnectionError, ReadTimeoutError) are named by their type."""
    return _code(error) if isinstance(error, ClientError) else ""
