"""A server that stops on purpose tells its streams when to come back: the closing
bookmark is followed by status OK with `retry-after-ms` (docs/protocol.md); a stream the
server merely rotates (its lifetime) carries no hint, so agents come back at once."""

from __future__ import annotations

from tests.conftest import HarnessFactory
from tests.support.harness import Recorder
from tests.support.processes import wait_until


async def ended_with(rec: Recorder) -> tuple[object, dict[str, str]]:
    await rec.ended.wait()
    return await rec.call.code(), dict(await rec.call.trailing_metadata() or ())


async def test_a_stopping_server_says_when_to_come_back(make_harness: HarnessFactory) -> None:
    h = await make_harness()
    node = await h.register("edge-1")
    rec = h.open_watch(node)
    await rec.wait_for(lambda r: "snapshot_end" in r.kinds, what="bootstrap")
    await h.app.stop()
    code, trailers = await ended_with(rec)
    assert rec.of("bookmark")[-1].closing
    assert str(code) == "StatusCode.OK"
    assert trailers.get("retry-after-ms") == "1000"


async def test_a_rotated_stream_has_no_hint(make_harness: HarnessFactory) -> None:
    h = await make_harness()
    node = await h.register("edge-1")
    rec = h.open_watch(node)
    await rec.wait_for(lambda r: "snapshot_end" in r.kinds, what="bootstrap")
    stream = next(iter(h.app.hub._streams))
    h.app.hub._expires[stream] = 0.0  # its lifetime is over

    async def rotated() -> None:
        h.app.hub.tick(h.app.hub._clock() + 2.0)
        assert rec.ended.is_set()

    await wait_until(rotated, 10, "the stream rotated")
    code, trailers = await ended_with(rec)
    assert rec.of("bookmark")[-1].closing and str(code) == "StatusCode.OK"
    assert "retry-after-ms" not in trailers
