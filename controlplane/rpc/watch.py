"""WatchBundles: admission, auth and waiting for the hub; the hub does the rest.

The handler registers the call with the hub and then only waits for it to end; every
write comes from the hub's fan-out (see watch/stream.py). Responses are pre-encoded
bytes, so the method is registered without a response serializer.
"""

from __future__ import annotations

import grpc

from controlplane.api.watch.v1 import watch_pb2 as pb
from controlplane.domain.kernel import observe as log_ids
from controlplane.domain.kernel.errors import InvalidArgument, ResourceExhausted, Unavailable
from controlplane.domain.ports import ChangeFeed
from controlplane.rpc import auth, observe
from controlplane.rpc.errors import set_status
from controlplane.watch import metrics
from controlplane.watch.hub import WatchHub

SERVICE = "controlplane.watch.v1.WatchService"


class WatchServicer:
    def __init__(
        self, hub: WatchHub, feed: ChangeFeed, visibility_timeout: float = 3.0, reconnect_hint_ms: int = 1000
    ):
        self._hub = hub
        # Told (as `retry-after-ms`) to every stream this server ends because it stops:
        # agents come back spread over it, to another replica at once if they know one.
        # A second spreads ten thousand agents over the admission limit's capacity.
        self._reconnect_hint = str(reconnect_hint_ms)
        self._feed = feed
        self._max_opening = hub.settings.max_opening
        self._visibility_timeout = visibility_timeout
        self._opening = 0

    async def WatchBundles(self, request: pb.WatchBundlesRequest, context: grpc.aio.ServicerContext) -> None:
        node_id = request.node_id
        if not node_id:
            raise InvalidArgument("must name the watching node", field="node_id")
        auth.require_node(node_id)
        since = request.since_revision
        if since < 0:
            raise InvalidArgument(f"{since} is negative; use 0 to bootstrap", field="since_revision")
        # Shutting down or cut off from the database: refuse before any work for it.
        self._hub.check_accepting()
        if self._opening >= self._max_opening:
            metrics.REJECTED.labels("admission").inc()
            raise ResourceExhausted("too many streams are opening; retry later", retry_after_ms=2000)
        self._opening += 1
        try:
            await self._wait_for_hub(node_id, since, request.epoch)
            stream = self._hub.open(node_id, since, request.epoch, context)
        finally:
            self._opening -= 1
        log_ids.bind(stream_id=stream.stream_id)
        observe.annotate(stream_id=stream.stream_id)
        try:
            end = await stream.done
        finally:
            self._hub.close(stream)
        if end is None and self._hub.stopping:
            context.set_trailing_metadata((("retry-after-ms", self._reconnect_hint),))
        if end is not None:
            # Set, not raised: a raised error would carry a traceback through this frame
            # (and grpc keeps it on the call), a cycle with the stream that gc.freeze()
            # would keep forever (see WatchStream.done).
            set_status(context, end)

    async def _wait_for_hub(self, node_id: str, since: int, epoch: str) -> None:
        """Make sure the hub knows the node, its epoch, and has read what it has seen.

        A node may have seen a revision this process has not read yet (another replica
        served it): wait for it briefly rather than take the node backwards. A revision
        beyond the database's head is answered with a reset by the hub instead. Likewise
        a node may bring an epoch another replica presented first (a promotion): wait
        for the hub to load it rather than reset a node that lost nothing.
        """
        hub = self._hub
        wait_for, wait_epoch = 0, None
        unknown_epoch = since > 0 and epoch != hub.epoch and epoch not in hub.forks
        if since > hub.position or unknown_epoch:
            position = await self._feed.position()
            if position.epoch != hub.epoch:
                wait_epoch = position.epoch
            wait_for = since if since <= position.head and position.epoch == epoch else 0
        if hub.knows_node(node_id) and wait_for <= hub.position and wait_epoch is None:
            return
        if not await hub.wait_until(node_id, wait_for, self._visibility_timeout, wait_epoch):
            metrics.REJECTED.labels("not_visible").inc()
            raise Unavailable("this server has not caught up with the node yet; retry", retry_after_ms=1000)


def handler(servicer: WatchServicer) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "WatchBundles": grpc.unary_stream_rpc_method_handler(
                servicer.WatchBundles,
                request_deserializer=pb.WatchBundlesRequest.FromString,
                response_serializer=None,
            )
        },
    )
