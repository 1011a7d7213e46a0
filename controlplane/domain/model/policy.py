"""A project's rollout policy: what every rollout of the project must satisfy, whoever
creates it. Set by the project's admins (`ProjectDirectory.set_policy`), read in the
transaction that creates a rollout (docs/rollouts.md, "Approvals")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from controlplane.domain.kernel.errors import InvalidArgument
from controlplane.domain.model.rollouts import MAX_APPROVALS


@dataclass(frozen=True, slots=True)
class ProjectPolicy:
    # Every rollout waits for at least this many approvals. 0 (the default) leaves the
    # number to the rollout's creator.
    min_approvals: int = 0

    def validated(self, field: str = "policy") -> ProjectPolicy:
        if not 0 <= self.min_approvals <= MAX_APPROVALS:
            raise InvalidArgument(f"must be 0-{MAX_APPROVALS}", field=f"{field}.min_approvals")
        return self

    def approvals_for(self, requested: int) -> int:
        """The approvals a rollout asking for `requested` needs: never fewer than the minimum."""
        return max(requested, self.min_approvals)

    def to_json(self) -> dict[str, Any]:
        return {"min_approvals": self.min_approvals}
