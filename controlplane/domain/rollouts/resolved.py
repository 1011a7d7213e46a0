"""Reading what decides nodes' desired state inside a writing transaction: the latest row
of their own keys, and their effective row resolved over all their keys, exactly as their
watch resolves it (the hub's image may be a commit behind)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from controlplane.domain.kernel.labels import node_key, parse_selector_key
from controlplane.domain.model.desired import DesiredRow, resolve
from controlplane.domain.ports import Tx

# Keys per `IN (...)` query: far below either database's parameter limit.
_CHUNK = 500
T = TypeVar("T")


def chunks(items: Sequence[T], size: int = _CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


async def latest_node_rows(tx: Tx, node_ids: Sequence[str]) -> dict[str, DesiredRow]:
    """The latest row of each node's own key (a pin, an assignment or a tombstone)."""
    rows: dict[str, DesiredRow] = {}
    for part in chunks(node_ids):
        found = await tx.desired.latest([node_key(n) for n in part])
        rows.update({key[5:]: row for key, row in found.items()})
    return rows


def is_pin(row: DesiredRow | None) -> bool:
    return row is not None and row.is_assignment and row.pinned


async def effective_rows(tx: Tx, project: str, node_ids: Sequence[str]) -> dict[str, DesiredRow | None]:
    """Each node's effective desired row, resolved inside `tx` over all its keys — its own
    `node:<id>` and every selector of the project its labels match — exactly as its watch
    resolves them (`desired.resolve`), at this transaction's snapshot (the hub's image
    may be a commit behind)."""
    own = await latest_node_rows(tx, node_ids)
    selectors = [
        (key, parsed[1])
        for key in await tx.desired.selector_keys(project)
        if (parsed := parse_selector_key(key)) is not None
    ]
    baselines: dict[str, DesiredRow] = {}
    for part in chunks([key for key, _ in selectors]):
        baselines.update(await tx.desired.latest(part))
    live = [(selector, baselines[key]) for key, selector in selectors if key in baselines]
    out: dict[str, DesiredRow | None] = {}
    for part in chunks(node_ids):
        for node in await tx.nodes.get_many(part):
            matching = (row for selector, row in live if selector.matches(node.labels))
            out[node.id] = resolve([own.get(node.id), *matching], node.id)
    return out


def previous_state(node_id: str, effective: DesiredRow | None) -> dict[str, Any]:
    """The `RolloutNode` fields recording `effective` (the node's desired row before the
    rollout's first write) and how a restore brings it back."""
    if effective is None:
        return {"previous_digest": "", "previous_weight": 100, "previous_key_digest": None}
    own = effective.key == node_key(node_id)
    return {
        "previous_digest": effective.digest,
        "previous_weight": effective.traffic_weight,
        "previous_key_digest": effective.digest if own else None,
    }
