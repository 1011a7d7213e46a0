"""Reading what decides nodes' desired state inside a writing transaction (the readers
live in `domain/desired.py`, which routing shares), and what a rollout records of it."""

from __future__ import annotations

from typing import Any

from controlplane.domain.desired import chunks, effective_rows, is_pin, latest_node_rows
from controlplane.domain.kernel.labels import node_key
from controlplane.domain.model.desired import DesiredRow

__all__ = ["chunks", "effective_rows", "is_pin", "latest_node_rows", "previous_state"]


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
