"""Pre-encoded WatchBundlesResponse fragments.

A WatchBundlesResponse is `repeated WatchEvent events = 1`, so one encoded event is the
field tag 0x0a, a varint length and the event bytes, and any concatenation of such
fragments is itself a valid WatchBundlesResponse. The hub encodes an event once and hands
the same bytes to every stream it goes to; a stream that has several fragments queued
sends them as one message.
"""

from __future__ import annotations

from controlplane.api.watch.v1 import watch_pb2 as pb
from controlplane.domain.kernel.labels import source_name
from controlplane.domain.model.desired import ChangeKind, DesiredRow


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def fragment(event: pb.WatchEvent) -> bytes:
    body = event.SerializeToString()
    return b"\x0a" + _varint(len(body)) + body


def started(stream_id: str, epoch: str, mode: pb.StreamMode.ValueType, head: int, floor: int) -> bytes:
    return fragment(
        pb.WatchEvent(
            started=pb.StreamStarted(
                stream_id=stream_id, epoch=epoch, mode=mode, head_revision=head, floor_revision=floor
            )
        )
    )


def desired(revision: int, row: DesiredRow | None) -> bytes:
    if row is None:
        return fragment(pb.WatchEvent(desired=pb.DesiredState(revision=revision)))
    if row.kind is ChangeKind.ROUTES:
        # A router assigned no bundle: its routing table alone.
        state = pb.DesiredState(revision=revision, trace_parent=row.trace_parent)
    else:
        state = pb.DesiredState(
            revision=revision,
            digest=row.digest,
            assigned_revision=row.revision,
            source=source_name(row.key),
            traffic_weight=row.traffic_weight,
            pinned=row.pinned,
            size_bytes=row.size_bytes,
            annotations=dict(row.annotations),
            signature=row.signature,
            key_id=row.key_id,
            trace_parent=row.trace_parent,
        )
    if row.routes is not None:
        table = row.routes
        state.router.CopyFrom(
            pb.RouterState(
                revision=row.routes_revision,
                selector=table.selector,
                backend=table.backend,
                backends=[
                    pb.RouterBackend(node_id=b.node_id, address=b.address, weight=b.weight)
                    for b in table.backends
                ],
            )
        )
    return fragment(pb.WatchEvent(desired=state))


def snapshot_end(revision: int) -> bytes:
    return fragment(pb.WatchEvent(snapshot_end=pb.SnapshotEnd(revision=revision)))


def bookmark(revision: int, closing: bool = False) -> bytes:
    return fragment(pb.WatchEvent(bookmark=pb.Bookmark(revision=revision, closing=closing)))


def reset(reason: pb.ResetReason.ValueType, floor: int, head: int, epoch: str) -> bytes:
    return fragment(
        pb.WatchEvent(reset=pb.Reset(reason=reason, floor_revision=floor, head_revision=head, epoch=epoch))
    )
