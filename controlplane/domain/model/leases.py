"""A lease as its holder sees it, and the error of losing it (`domain/leases.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from controlplane.domain.kernel.errors import Aborted


@dataclass(frozen=True, slots=True)
class Lease:
    name: str
    holder: str
    epoch: int
    expires_at: datetime
    # Our own monotonic deadline: past it we act as if the lease were lost.
    local_deadline: float = 0.0
    # Renewed by the keeper rather than by acquire().
    kept: bool = False


class LeaseLost(Aborted):
    """The lease changed hands (or expired and was taken): the transaction is void."""
