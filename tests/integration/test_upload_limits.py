"""An oversized upload is refused as soon as the announced or received size passes the
limit (`--max-bundle-bytes`), naming the file: a header announcing too much is refused
before any of its bytes are sent."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import grpc
import pytest

from controlplane.api.bundle.v1 import bundle_pb2
from tests.conftest import HarnessFactory
from tests.support.archives import bundle

LIMIT = 4096


async def refused_after(
    harness_bundles: object, messages: list[bundle_pb2.CreateBundleRequest]
) -> grpc.RpcError:
    """CreateBundle that sends `messages` and then holds the stream open, sending nothing:
    only a refusal based on what was sent so far can end it."""
    sent = asyncio.Event()

    async def requests() -> AsyncIterator[bundle_pb2.CreateBundleRequest]:
        yield bundle_pb2.CreateBundleRequest(header=bundle_pb2.CreateBundleHeader(project="default"))
        for message in messages:
            yield message
        sent.set()
        await asyncio.Event().wait()

    with pytest.raises(grpc.RpcError) as refused:
        await asyncio.wait_for(harness_bundles.CreateBundle(requests()), 30)  # type: ignore[attr-defined]
    assert sent.is_set()
    return refused.value


async def test_a_header_announcing_too_much_is_refused_at_once(make_harness: HarnessFactory) -> None:
    h = await make_harness(max_bundle_bytes=LIMIT)
    error = await refused_after(
        h.bundles,
        [bundle_pb2.CreateBundleRequest(file=bundle_pb2.FileHeader(path="huge.bin", size_bytes=10**9))],
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "file.size_bytes" in error.details() and "'huge.bin'" in error.details()


async def test_the_file_that_takes_the_total_past_the_limit_is_named(make_harness: HarnessFactory) -> None:
    h = await make_harness(max_bundle_bytes=LIMIT)
    first = b"a" * 3000
    error = await refused_after(
        h.bundles,
        [
            bundle_pb2.CreateBundleRequest(
                file=bundle_pb2.FileHeader(path="one.conf", size_bytes=len(first))
            ),
            bundle_pb2.CreateBundleRequest(chunk=first),
            bundle_pb2.CreateBundleRequest(file=bundle_pb2.FileHeader(path="two.conf", size_bytes=2000)),
        ],
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'two.conf'" in error.details() and f"limit of {LIMIT}" in error.details()


async def test_an_archive_upload_past_the_limit_is_refused(make_harness: HarnessFactory) -> None:
    h = await make_harness(max_bundle_bytes=LIMIT)
    archive = bundle({"noise.bin": os.urandom(3 * LIMIT)})
    with pytest.raises(grpc.RpcError) as refused:
        await h.upload(archive)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"passed the limit of {LIMIT} bytes" in refused.value.details()
