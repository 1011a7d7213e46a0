"""The signing keys: this server's own, the ones nodes may trust, and rotation.

Rotation, without a node ever holding an unverifiable assignment:
1. A server starts with a new key: `register` records its public half as ACTIVE and
   `sign_unsigned` gives every valid bundle a signature by it. Assignments written from
   now on carry the new signature (the newest by an active key). Started with the old
   key as `cross_signer` too, it has each key endorse the other (domain/bundles/key_trust.py).
2. Agents trust both keys meanwhile: their trusted-keys file lists both (a server
   writes `<data-dir>/trusted-keys.json` at each start with the keys it can prove:
   its own and those endorsed from it, never a key that is only a database row).
3. `retire(old)`: the old key stops verifying. In the same transaction every current
   assignment still carrying an old signature is written again with the new one (one
   revision per distinct assignment), so a node that bootstraps later is never handed
   a signature it must refuse. Agents running those bundles just acknowledge them.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from controlplane.domain.bundles.key_trust import provable
from controlplane.domain.bundles.registry import require_assignable
from controlplane.domain.bundles.signing import Signer
from controlplane.domain.desired import write_assignment
from controlplane.domain.kernel.errors import DomainError, FailedPrecondition, InvalidArgument, NotFound
from controlplane.domain.model.bundles import Endorsement, KeyState, SigningKey
from controlplane.domain.model.desired import Assignment, DesiredRow
from controlplane.domain.ports import Clock, Store, Tx

log = logging.getLogger(__name__)

# Bundles signed per transaction at start: short transactions, few of them.
SIGN_BATCH = 500


@dataclass
class KeyDirectory:
    store: Store
    clock: Clock
    signer: Signer
    notify: Callable[[], None]
    # Another key this server holds (the one being rotated out): it and the signer
    # endorse each other at start, so replicas signing with either trust both.
    cross_signer: Signer | None = None

    async def register(self) -> None:
        """Record this server's key (at start). A retired key may not sign again."""
        key_id = self.signer.key_id
        async with self.store.write() as tx:
            known = await tx.signing_keys.get(key_id)
            if known is not None and known.state is KeyState.RETIRED:
                raise FailedPrecondition(
                    f"this server's signing key {key_id} was retired; configure a new key "
                    "(controlplane signing-keys generate)",
                    field="signing_key",
                )
            if known is None:
                await tx.signing_keys.insert(
                    SigningKey(key_id, self.signer.public_key, KeyState.ACTIVE, self.clock())
                )
                await tx.audit.record(
                    "signing_key.register", f"signing_key/{key_id}", after={"state": "active"}
                )
            if self.cross_signer is not None:
                await self._cross_sign(tx, self.cross_signer)

    async def _cross_sign(self, tx: Tx, other: Signer) -> None:
        """Each of our keys endorses the other (the other registered too if new)."""
        if await tx.signing_keys.get(other.key_id) is None:
            await tx.signing_keys.insert(
                SigningKey(other.key_id, other.public_key, KeyState.ACTIVE, self.clock())
            )
        known = {(e.key_id, e.endorser_key_id) for e in await tx.signing_keys.endorsements()}
        now = self.clock()
        for endorser, endorsed in ((self.signer, other), (other, self.signer)):
            if (endorsed.key_id, endorser.key_id) in known:
                continue
            signature = endorser.endorse(endorsed.public_key)
            await tx.signing_keys.endorse(Endorsement(endorsed.key_id, endorser.key_id, signature), now)
            await tx.audit.record(
                "signing_key.endorse",
                f"signing_key/{endorsed.key_id}",
                after={"endorsed_by": endorser.key_id},
            )

    async def trusted(self) -> list[SigningKey]:
        """The keys this server can prove (domain/bundles/key_trust.py), in every state: what it
        offers agents to trust, and the retirements among them."""
        anchors = {self.signer.key_id: self.signer.public_key}
        if self.cross_signer is not None:
            anchors[self.cross_signer.key_id] = self.cross_signer.public_key
        async with self.store.read() as tx:
            keys = await tx.signing_keys.all()
            endorsements = await tx.signing_keys.endorsements()
        return provable(anchors, keys, endorsements)

    async def sign_unsigned(self) -> int:
        """Sign every valid bundle this key has not signed yet; returns how many."""
        key_id = self.signer.key_id
        total = 0
        while True:
            async with self.store.write() as tx:
                pending = await tx.bundles.unsigned_by(key_id, SIGN_BATCH)
                now = self.clock()
                for project, digest in pending:
                    await tx.bundles.add_signature(project, digest, key_id, self.signer.sign(digest), now)
                if pending:
                    await tx.audit.record(
                        "bundle.sign",
                        f"signing_key/{key_id}",
                        after={"bundles": len(pending), "key_id": key_id},
                    )
            total += len(pending)
            if len(pending) < SIGN_BATCH:
                return total

    async def list(self) -> list[SigningKey]:
        async with self.store.read() as tx:
            return await tx.signing_keys.all()

    async def retire(self, key_id: str) -> tuple[SigningKey, int]:
        """Retire a key; returns it and how many assignments were signed again."""
        if not key_id or len(key_id) > 64:
            raise InvalidArgument("give a key id", field="signing_key_id")
        if key_id == self.signer.key_id:
            raise FailedPrecondition(
                f"this server signs with {key_id}; start it with a new key before retiring this one",
                field="signing_key_id",
            )
        async with self.store.write() as tx:
            # Before the key changes: an assignment that read it as active has committed
            # (and is re-signed below) or waits, and then reads it retired.
            await tx.desired.lock()
            key = await tx.signing_keys.get(key_id)
            if key is None:
                raise NotFound(f"signing key {key_id} does not exist", field="signing_key_id")
            if key.state is KeyState.RETIRED:
                return key, 0
            now = self.clock()
            await tx.signing_keys.retire(key_id, now)
            groups: dict[tuple[object, ...], list[DesiredRow]] = defaultdict(list)
            for row in await tx.bundles.assignments_signed_by(key_id):
                groups[
                    (
                        row.project,
                        row.digest,
                        row.pinned,
                        row.traffic_weight,
                        tuple(sorted(row.annotations.items())),
                        row.baseline,
                        row.exclude,
                    )
                ].append(row)
            reissued = skipped = 0
            for rows in groups.values():
                first = rows[0]
                try:
                    bundle = await require_assignable(tx, first.project, first.digest)
                except DomainError as e:
                    # A revoked bundle stays as it is: its nodes must move off it anyway.
                    log.warning("not re-signing assignments of %s: %s", first.digest, e)
                    skipped += len(rows)
                    continue
                assignment = Assignment(
                    first.project,
                    tuple(r.key for r in rows),
                    first.digest,
                    bundle.size_bytes,
                    first.traffic_weight,
                    first.pinned,
                    dict(first.annotations),
                    signature=bundle.signature,
                    key_id=bundle.key_id,
                    baseline=first.baseline,
                    exclude=first.exclude,
                )
                await write_assignment(tx, assignment, now.timestamp())
                reissued += len(rows)
            await tx.audit.record(
                "signing_key.retire",
                f"signing_key/{key_id}",
                before={"state": "active"},
                after={"state": "retired", "assignments_resigned": reissued, "assignments_skipped": skipped},
            )
            if reissued:
                tx.after_commit(self.notify)
            retired = await tx.signing_keys.get(key_id)
        assert retired is not None
        return retired, reissued
