"""Request rate, 5xx rate and p99 between two readings of a proxy's counters.

Proxies keep cumulative counters; a heartbeat reports what happened since the previous
one. A counter that went down was reset (HAProxy's new worker after a reload, a proxy
restart): its new value is all that is known of the window, so it is taken as the delta.
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def delta(previous: float, current: float) -> float:
    return current - previous if current >= previous else current


def quantile(histogram: Mapping[float, float], q: float) -> float | None:
    """The nearest-rank `q` quantile of {value: count}; None when it is empty."""
    total = sum(histogram.values())
    if total <= 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0.0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= rank:
            return value
    return max(histogram)


def ratio(part: float, whole: float) -> float:
    """part/whole, 0 for an empty window (no request failed), within [0, 1]."""
    if whole <= 0:
        return 0.0
    return min(1.0, max(0.0, part / whole))
