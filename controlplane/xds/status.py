"""What an xDS node has accepted, as the rest of the control plane sees it.

xDS is not atomic across types: Envoy may take the clusters of revision R and refuse
its listeners. So a node is ACTIVE at R only once every type of R is acknowledged; a
refusal (NACK) of any type makes it FAILED at R with Envoy's error, and the stream puts
the types Envoy did accept back to the last revision accepted whole (`running_*`), so
the node runs that configuration exactly, never a mix.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from controlplane.domain.model.fleet import XdsRecord


class Phase(enum.StrEnum):
    # Moving to `revision`: some type is not acknowledged yet.
    PENDING = "pending"
    # Every type of `revision` is acknowledged.
    ACTIVE = "active"
    # Envoy refused `revision`; the node runs `running_revision`.
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Nack:
    revision: int
    type_url: str
    error: str


@dataclass(frozen=True, slots=True)
class NodeXdsStatus:
    phase: Phase
    # The revision the phase is about: the target, or the one refused.
    revision: int
    digest: str
    # The last revision every type of which the node acknowledged (0: none yet).
    running_revision: int = 0
    running_digest: str = ""
    error: str = ""
    # Per type URL, the version the node last acknowledged.
    acked: Mapping[str, str] = field(default_factory=dict)
    last_nack: Nack | None = None

    def record(self) -> XdsRecord:
        """What is kept of it with the node's report, for every replica to show."""
        nack = self.last_nack
        return XdsRecord(
            dict(self.acked),
            self.running_revision,
            self.running_digest,
            nack.revision if nack is not None else 0,
            nack.type_url if nack is not None else "",
            nack.error if nack is not None else "",
        )

    def same_as(self, other: NodeXdsStatus | None) -> bool:
        """Equal in everything a report carries (acked versions included)."""
        return other is not None and (
            self.phase,
            self.revision,
            self.digest,
            self.running_revision,
            self.error,
            dict(self.acked),
        ) == (
            other.phase,
            other.revision,
            other.digest,
            other.running_revision,
            other.error,
            dict(other.acked),
        )
