"""Reconnect backoff: full jitter inside a doubling ceiling, a cap, and client-go's reset rule."""

from __future__ import annotations

import random

import pytest

from agent_stub.backoff import Backoff, BackoffPolicy, StreamOutcome

POLICY = BackoffPolicy(base=0.5, factor=2.0, cap=30.0, reset_after=120.0, short_lived=1.0)


def test_ceiling_doubles_from_the_base_up_to_the_cap() -> None:
    backoff = Backoff(POLICY, rng=lambda: 1.0)
    delays = [backoff.failure() for _ in range(9)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_full_jitter_draws_from_zero_to_the_ceiling() -> None:
    rng = random.Random(7)
    backoff = Backoff(POLICY, rng=rng.random)
    for _ in range(200):
        ceiling = backoff.ceiling()
        delay = backoff.failure()
        assert 0.0 <= delay <= ceiling <= POLICY.cap
    # Full jitter, not "ceiling plus or minus a bit": small delays happen at the cap too.
    at_cap = [backoff.failure() for _ in range(500)]
    assert min(at_cap) < POLICY.cap * 0.1
    assert max(at_cap) > POLICY.cap * 0.9


def test_zero_jitter_draw_means_no_wait() -> None:
    backoff = Backoff(POLICY, rng=lambda: 0.0)
    assert backoff.failure() == 0.0
    assert backoff.failures == 1


def test_ceiling_survives_many_failures() -> None:
    backoff = Backoff(POLICY, rng=lambda: 1.0)
    backoff.failures = 10_000
    assert backoff.failure() == POLICY.cap


def test_two_minutes_of_healthy_streaming_resets_the_backoff() -> None:
    backoff = Backoff(POLICY, rng=lambda: 1.0)
    for _ in range(6):
        backoff.failure()
    assert backoff.ceiling() == 30.0
    delay = backoff.after_stream(StreamOutcome(duration=125.0, messages=9, healthy_for=121.0))
    assert delay == POLICY.base
    assert backoff.failures == 1


def test_shorter_healthy_streaming_keeps_growing() -> None:
    backoff = Backoff(POLICY, rng=lambda: 1.0)
    for _ in range(3):
        backoff.failure()
    delay = backoff.after_stream(StreamOutcome(duration=100.0, messages=20, healthy_for=99.0))
    assert delay == 4.0
    assert backoff.failures == 4


def test_short_lived_stream_counts_as_a_failure() -> None:
    backoff = Backoff(POLICY, rng=lambda: 1.0)
    outcome = StreamOutcome(duration=0.3, messages=0)
    assert backoff.is_short_lived(outcome)
    assert [backoff.after_stream(outcome) for _ in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff.failures == 4


def test_short_lived_stream_never_resets_even_after_long_uptime() -> None:
    backoff = Backoff(POLICY, rng=lambda: 1.0)
    for _ in range(5):
        backoff.failure()
    # A nonsensical healthy_for on a stream with no message must not reset anything.
    backoff.after_stream(StreamOutcome(duration=0.2, messages=0, healthy_for=500.0))
    assert backoff.failures == 6


def test_a_stream_that_delivered_is_not_short_lived() -> None:
    backoff = Backoff(POLICY)
    assert not backoff.is_short_lived(StreamOutcome(duration=0.2, messages=1))
    assert not backoff.is_short_lived(StreamOutcome(duration=5.0, messages=0))


def test_closing_bookmark_reconnects_at_once_without_counting() -> None:
    backoff = Backoff(POLICY, rng=lambda: 1.0)
    backoff.failure()
    backoff.failure()
    delay = backoff.after_stream(StreamOutcome(duration=30.0, messages=5, healthy_for=30.0, closing=True))
    assert delay == 0.0
    assert backoff.failures == 2


def test_closing_after_a_long_healthy_stream_also_resets() -> None:
    backoff = Backoff(POLICY, rng=lambda: 1.0)
    for _ in range(5):
        backoff.failure()
    assert (
        backoff.after_stream(StreamOutcome(duration=900.0, messages=60, healthy_for=899.0, closing=True)) == 0
    )
    assert backoff.failures == 0


@pytest.mark.parametrize("hint", [3.0, 45.0])
def test_retry_after_hint_is_a_floor(hint: float) -> None:
    backoff = Backoff(POLICY, rng=lambda: 1.0)
    delay = backoff.after_stream(StreamOutcome(duration=0.1, retry_after=hint))
    assert delay == max(POLICY.base, hint)


def test_at_cap_waits_about_the_cap() -> None:
    rng = random.Random(3)
    backoff = Backoff(POLICY, rng=rng.random)
    delays = [backoff.at_cap() for _ in range(100)]
    assert all(POLICY.cap / 2 <= d <= POLICY.cap for d in delays)
    assert backoff.failures == 100


def test_an_unreachable_server_is_probed_on_a_fixed_cadence_then_backed_off() -> None:
    policy = BackoffPolicy(base=0.5, cap=30.0, probe_interval=0.4, probe_for=10.0)
    backoff = Backoff(policy, rng=lambda: 1.0)
    for _ in range(5):
        backoff.failure()  # the outage began with growing failures
    # Within the window every probe is at most 1.5x the interval, however many failed.
    probes = [backoff.unreachable(now) for now in (100.0, 101.0, 105.0, 109.9)]
    assert probes == pytest.approx([0.6] * 4)
    assert backoff.failures == 5, "probes are not failures"
    # Past it the growing backoff takes over again.
    assert backoff.unreachable(110.0) == 0.5 * 2**5
    # A server that answered (whatever it said) starts a new window.
    backoff.reachable()
    assert backoff.unreachable(500.0) == pytest.approx(0.6)


def test_a_closing_stream_with_a_hint_comes_back_within_the_hint() -> None:
    backoff = Backoff(POLICY, rng=lambda: 0.25)
    delay = backoff.after_stream(StreamOutcome(duration=30.0, messages=5, closing=True, retry_after=2.0))
    assert delay == 0.5
    assert backoff.failures == 0
