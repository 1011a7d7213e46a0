"""Read your writes across serving processes (`serve --workers`), made deterministic.

Worker 0 is an in-process App whose hub is never woken by anything but the barrier: no
datagram reaches it, and its safety-net sweep is an hour away. Another process (a second
App on the same SQLite file) commits a revision, and the test then does what worker 1
does after a commit: it writes the revision into worker 1's slot of the shared file
(store/peers.py). The next call to worker 0 must see the revision anyway: the barrier in
its interceptor makes the hub read it before the call is answered.
"""

from __future__ import annotations

import mmap
import os

import pytest

from controlplane.api.node.v1 import node_pb2 as npb
from controlplane.store.peers import HEADS_FILE, create_heads
from controlplane.watch.hub import HubSettings
from tests.conftest import HarnessFactory
from tests.support.archives import bundle

# A sweep this slow never runs within a test.
NEVER = HubSettings(bookmark_interval=1.0, sweep_interval=3600.0)


def tell_slot(data_dir: os.PathLike[str], index: int, revision: int) -> None:
    """What worker `index` does after it commits `revision`, minus the datagram."""
    fd = os.open(os.path.join(data_dir, HEADS_FILE), os.O_RDWR)
    try:
        with mmap.mmap(fd, 0) as shared:
            slots = memoryview(shared).cast("Q")
            slots[index] = revision
            slots.release()
    finally:
        os.close(fd)


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_a_call_to_one_worker_sees_what_another_committed_before_it(
    make_harness: HarnessFactory,
) -> None:
    writer = await make_harness()
    data_dir = writer.app.settings.data_dir
    create_heads(data_dir, 2)
    worker = await make_harness(workers=2, process_index=0, hub=NEVER)
    digest = await writer.upload(bundle({"nginx.conf": b"events {}\n"}))
    node = await writer.register("edge-1", {"env": "prod"})
    revision = await writer.assign(digest, selector="env=prod")

    # Nothing told worker 0's hub: it has not read the write.
    assert worker.app.hub.position < revision

    tell_slot(data_dir, 1, revision)
    got = await worker.nodes.GetNode(npb.GetNodeRequest(node_id=node.node_id))
    assert (got.node.desired_digest, got.node.desired_revision) == (digest, revision)
    assert worker.app.hub.position >= revision

    # And a stream opened afterwards starts from it.
    later = await writer.upload(bundle({"nginx.conf": b"events { worker_connections 64; }\n"}))
    revision = await writer.assign(later, selector="env=prod")
    assert worker.app.hub.position < revision
    tell_slot(data_dir, 1, revision)
    stream = worker.open_watch(node)
    await stream.wait_for(lambda r: "snapshot_end" in r.kinds, what="the bootstrap")
    assert stream.of("desired")[-1].digest == later
    assert stream.of("snapshot_end")[0].revision >= revision
    await stream.cancel()
