"""Token buckets per identity, on a fake clock."""

from __future__ import annotations

import pytest

from controlplane.domain.kernel.errors import InvalidArgument
from controlplane.rpc.ratelimit import RateLimit, RateLimiter, RateLimits


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


TWO_PER_SECOND = RateLimit(2.0, 4.0)


def limiter(clock: Clock, operator: RateLimit = TWO_PER_SECOND, max_buckets: int = 200_000) -> RateLimiter:
    return RateLimiter(RateLimits(operator=operator), clock, max_buckets)


def test_burst_then_refill_at_the_rate() -> None:
    clock = Clock()
    rl = limiter(clock)
    assert [rl.take("operator", "k") for _ in range(4)] == [None] * 4
    wait = rl.take("operator", "k")
    assert wait == pytest.approx(0.5)  # one call per 0.5 s at 2/s
    clock.now += 0.5
    assert rl.take("operator", "k") is None
    assert rl.take("operator", "k") is not None
    clock.now += 60
    assert [rl.take("operator", "k") for _ in range(5)].count(None) == 4  # refills only to the burst


def test_buckets_are_per_identity_and_class() -> None:
    clock = Clock()
    rl = limiter(clock)
    for _ in range(4):
        rl.take("operator", "noisy")
    assert rl.take("operator", "noisy") is not None
    assert rl.take("operator", "quiet") is None
    assert rl.take("node", "noisy") is None


def test_peek_does_not_spend() -> None:
    clock = Clock()
    rl = limiter(clock, RateLimit(1.0, 1.0))
    assert rl.peek("operator", "k") is None
    assert rl.take("operator", "k") is None
    assert rl.peek("operator", "k") == pytest.approx(1.0)
    assert rl.peek("operator", "k") == pytest.approx(1.0)


def test_zero_rate_is_off() -> None:
    rl = limiter(Clock(), RateLimit(0.0, 0.0))
    assert all(rl.take("operator", "k") is None for _ in range(1000))
    assert len(rl) == 0


def test_memory_is_bounded_by_dropping_idle_buckets() -> None:
    clock = Clock()
    rl = limiter(clock, max_buckets=100)
    for i in range(100):
        rl.take("operator", f"k{i}")
    clock.now += 10  # everyone refilled: idle
    rl.take("operator", "busy")
    assert len(rl) == 1
    for i in range(150):
        rl.take("operator", f"b{i}")
    assert len(rl) <= 100


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("50:200", RateLimit(50, 200)),
        ("10", RateLimit(10, 40)),
        ("0", RateLimit(0, 0)),
        ("0.5:1", RateLimit(0.5, 1)),
    ],
)
def test_parse(text: str, want: RateLimit) -> None:
    assert RateLimit.parse(text) == want


@pytest.mark.parametrize("text", ["", "x", "-1", "5:0", "nan", "inf:1", "1:2:3"])
def test_parse_refuses(text: str) -> None:
    with pytest.raises(InvalidArgument):
        RateLimit.parse(text)
