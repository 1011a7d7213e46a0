"""Node credentials: checking one (to issue a token) and revoking a node's identity.

Revoking clears the credential and appends a REVOKED row to the node's `meta:` key in
one transaction: every replica's hub ends the node's streams when it reads the row, and
`NodeRevocations` refuses every token issued before it (see `node_tokens`). The replica
that revoked also refuses the tokens at once on commit, whatever its hub's pace.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from controlplane.domain.identity.node_tokens import NodeRevocations
from controlplane.domain.kernel.errors import NotFound, Unauthenticated
from controlplane.domain.kernel.labels import meta_key
from controlplane.domain.kernel.secrets import BARRED, secret_matches
from controlplane.domain.model.desired import ChangeKind, DesiredRow
from controlplane.domain.model.fleet import Node
from controlplane.domain.ports import Clock, DesiredView, Store, Tx

# How long a revocation waits for this process's hub to end the node's streams here
# before answering. Not longer: the revocation is committed and its tokens are refused
# here already; a hub that is slower ends the streams when it reads the row, as every
# other replica's does, and an operator's call should not hang on a stalled hub.
ROUTED_WITHIN = 2.0

log = logging.getLogger(__name__)


@dataclass
class NodeCredentials:
    store: Store
    clock: Clock
    view: DesiredView
    notify: Callable[[], None]
    # This process's token revocations (also fed by its hub's reads).
    revocations: NodeRevocations

    async def verify(self, node_id: str, credential: str) -> tuple[Node, int]:
        """The node whose current credential this is, and the log's head read with the
        credential, never after it (the `rev` of the token about to be issued). One
        statement: a stream open of an Envoy pays it on every reconnect."""
        node, stored, head = await self._read(node_id)
        if node is None or not secret_matches(credential, stored):
            raise Unauthenticated("node credential is not valid")
        return node, head

    async def enrolled(self, node_id: str) -> tuple[Node, int]:
        """The node, if it holds a live credential (enrolled and not revoked), and the
        log's head read with it: a node authenticated by other means (its client
        certificate, docs/xds.md) is refused once revoked, as its credential is."""
        node, stored, head = await self._read(node_id)
        if node is None or stored in ("", BARRED):
            raise Unauthenticated(f"node {node_id[:64]!r} is not enrolled, or was revoked")
        return node, head

    async def _read(self, node_id: str) -> tuple[Node | None, str, int]:
        """(node, credential hash, head), in one snapshot; (None, "", 0) for no such node.
        Read at every check, never cached: a credential revoked on any replica is
        refused by the next stream that presents it."""
        async with self.store.read() as tx:
            found = await tx.nodes.with_credential(node_id)
        return found if found is not None else (None, "", 0)

    async def revoke(self, node_id: str, allow_reenroll: bool = False) -> int:
        """End the node's identity: its credential, tokens and open streams. Returns the
        revision of the revocation. The node record stays. Its name stays barred from
        registering again unless `allow_reenroll`: then the next registration with an
        enrollment token takes it (and the node id) afresh."""
        async with self.store.write() as tx:
            node = await tx.nodes.get(node_id)
            if node is None:
                raise NotFound(f"node {node_id!r} does not exist", field="node_id")
            previous = await tx.identity.clear_node_credential(node_id, barred=not allow_reenroll)
            revision = await append_revocation(tx, node, self.clock().timestamp(), self.notify)
            await tx.audit.record(
                "node.revoke",
                f"node/{node_id}",
                project=node.project,
                before={"credential": _state(previous)},
                after={"credential": "revoked", "reenroll": allow_reenroll, "revision": revision},
            )
        # Committed: refuse its tokens here now rather than when the hub reads the row.
        self.revocations.merge({node_id: revision})
        if not await self.view.wait_until(None, revision, ROUTED_WITHIN):
            log.warning(
                "node %s revoked at revision %d; this replica's hub has not read it yet, so its "
                "streams here end when it does (its tokens are refused already)",
                node_id,
                revision,
            )
        return revision


def _state(credential_hash: str) -> str:
    if credential_hash == BARRED:
        return "barred"
    return "live" if credential_hash else "revoked"


async def append_revocation(tx: Tx, node: Node, written_at: float, notify: Callable[[], None]) -> int:
    """Append the REVOKED row that ends the node's streams and tokens everywhere."""
    revision = await tx.desired.allocate_revision()
    row = DesiredRow(meta_key(node.id), revision, node.project, ChangeKind.REVOKED, written_at=written_at)
    await tx.desired.append([row])
    tx.after_commit(notify)
    return revision


async def load_revocations(store: Store) -> dict[str, int]:
    """Every node's latest revocation still in the log (at start: tokens issued before a
    revocation that the hub's snapshot no longer shows stay dead across restarts)."""
    async with store.read() as tx:
        return await tx.identity.revocation_floors()
