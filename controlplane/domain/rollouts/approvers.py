"""Who may approve a rollout, beyond "not the key that created it".

Anyone who can mint keys could otherwise mint a second key and approve their own
rollout. Every API key records the actor that minted it (`created_by`), so keys form
minting lines: a key, the key that minted it, the key that minted that one, and so on up
to the first-start key (minted by the system). Two keys are in one line when one of them
minted the other, directly or transitively. An approval is refused

- PERMISSION_DENIED, when the approver is in one line with the rollout's creator: the
  creator itself, a key the creator minted (or a key minted by one of those), or the
  key that minted the creator (or its minter, ...);
- ALREADY_EXISTS, when the approver is in one line with a key that already approved:
  approvals from one minting line count once.

What this cannot tell apart: keys minted by one admin for two people are siblings, not
one line, so an admin can still mint two unrelated keys and approve with both
(docs/security.md says so; the audit log names who minted each key). The first-start
key minted every other key, so it can approve nothing.
"""

from __future__ import annotations

from collections.abc import Collection

from controlplane.domain.audit.context import ActorKind
from controlplane.domain.kernel.errors import AlreadyExists, PermissionDenied
from controlplane.domain.ports import Tx

_OPERATOR = f"{ActorKind.OPERATOR.value}:"
# A line longer than this is not followed further: real minting lines are a few keys
# long, and each step is one primary-key read inside the approving transaction.
MAX_LINE = 64


async def minting_line(tx: Tx, actor: str) -> tuple[str, ...]:
    """`actor` and the actors that minted it, nearest first: `operator:<key id>` strings,
    ending with a non-key actor (`system:first-start`) or a key no longer known."""
    line = [actor]
    while len(line) < MAX_LINE and line[-1].startswith(_OPERATOR):
        found = await tx.identity.api_key(line[-1].removeprefix(_OPERATOR))
        if found is None or not found[0].created_by or found[0].created_by in line:
            break
        line.append(found[0].created_by)
    return tuple(line)


def _one_line(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Whether one of the two keys minted the other (or they are the same key)."""
    return a[0] in b or b[0] in a


async def check_approver(
    tx: Tx, rollout_id: str, actor: str, creator: str, approvers: Collection[str]
) -> None:
    """Refuse `actor`'s approval of rollout `rollout_id` (created by `creator`, approved
    so far by `approvers`) when it shares a minting line with the creator or with one
    of the approvers."""
    mine = await minting_line(tx, actor)
    if actor == creator:
        raise PermissionDenied(f"{actor} created rollout {rollout_id} and cannot approve it")
    theirs = await minting_line(tx, creator)
    if creator in mine:
        raise PermissionDenied(
            f"{actor} was minted (directly or through other keys) by {creator}, which created rollout "
            f"{rollout_id}: it cannot approve it"
        )
    if actor in theirs:
        raise PermissionDenied(
            f"{actor} minted (directly or through other keys) {creator}, which created rollout "
            f"{rollout_id}: it cannot approve it"
        )
    for other in sorted(approvers):
        if other == actor:
            raise AlreadyExists(f"{actor} already approved rollout {rollout_id}")
        if _one_line(mine, await minting_line(tx, other)):
            raise AlreadyExists(
                f"{actor} and {other}, which already approved rollout {rollout_id}, are in one minting "
                "line (one minted the other): approvals from one line count once"
            )
