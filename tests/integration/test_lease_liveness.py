"""Leases of dead processes are taken at once; live ones, however slow, are not
(store/liveness.py, store/lease_keeper.py). Both backends: PostgreSQL proves liveness
with a session advisory lock on the keeper's own connection, SQLite with an flock.

Every lease here lives far longer than the test: whatever changes hands does so because
its holder is provably gone, never because the lease ran out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest

from controlplane.domain.audit.context import acting_as, system
from controlplane.domain.kernel.clock import utcnow
from controlplane.domain.leases import Leases
from controlplane.domain.model.leases import LeaseLost
from controlplane.store.liveness import FileLiveness, holder_identity, replica_of
from tests.conftest import HarnessFactory
from tests.support.liveness import alive

LONG = timedelta(seconds=600)


async def test_a_live_holder_keeps_its_lease_and_a_gone_one_loses_it_at_once(
    make_harness: HarnessFactory,
) -> None:
    plane = await make_harness(lease_ttl=LONG)
    app = plane.app
    mine = Leases(app.store, utcnow, ttl=LONG, holder=app.leases.holder)
    dead = Leases(app.store, utcnow, ttl=LONG, holder=holder_identity("elsewhere"))
    with acting_as(system("test")):
        async with alive(app, dead.holder):
            theirs = await dead.acquire("job")
            assert theirs is not None
            # Alive, its lease unexpired: not ours to take.
            assert await mine.acquire("job") is None
        # Its process is gone (the liveness lock went with it): taken at once, under a
        # new epoch that fences anything it might still write.
        taken = await mine.acquire("job")
        assert taken is not None and taken.epoch == theirs.epoch + 1
        with pytest.raises(LeaseLost):
            async with app.store.write() as tx:
                await Leases.fence(tx, theirs)


async def test_a_restarted_process_is_a_new_holder_of_the_same_replica(make_harness: HarnessFactory) -> None:
    first = await make_harness(replica_id="edge-cp-1")
    second = await make_harness(replica_id="edge-cp-1")
    one, two = first.app.leases.holder, second.app.leases.holder
    assert one != two and replica_of(one) == replica_of(two) == "edge-cp-1/0"
    with acting_as(system("test")):
        assert await first.app.leases.acquire("job", keep=True) is not None
        # Same replica name, another incarnation: it must not take a live one's lease.
        assert await second.app.leases.acquire("job") is None


def block_the_loop(seconds: float) -> None:
    """Hold the event loop (the caller's) without yielding, as a long fan-out would."""
    time.sleep(seconds)


async def test_the_keeper_renews_while_the_event_loop_is_blocked(make_pg_harness: HarnessFactory) -> None:
    """A loop held for three times the lease's life (a fan-out, a heap collection) costs
    the replica nothing: the keeper renews from its own thread."""
    plane = await make_pg_harness(lease_ttl=timedelta(seconds=1))
    leases = plane.app.leases
    assert leases.keeper is not None
    with acting_as(system("test")):
        lease = await leases.acquire("job", keep=True)
    assert lease is not None and lease.kept
    renewals = plane.app._keeper.renewals if plane.app._keeper else 0
    block_the_loop(3.0)
    assert plane.app._keeper is not None and plane.app._keeper.renewals > renewals
    assert leases.valid(lease), "the lease lapsed while the loop was blocked"
    unkept = Leases(plane.app.store, utcnow, ttl=timedelta(seconds=1), holder=leases.holder)
    with acting_as(system("test")):
        other = await unkept.acquire("unkept")
    assert other is not None
    block_the_loop(1.5)
    assert not unkept.valid(other), "control: a lease renewed on the loop lapses"


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from controlplane.store.liveness import FileLiveness
    FileLiveness(Path(sys.argv[1])).hold(sys.argv[2])
    print("holding", flush=True)
    time.sleep(600)
    """
)


def test_a_killed_process_releases_its_file_lock(tmp_path: Path) -> None:
    directory = tmp_path / "holders"
    holder = holder_identity("r")
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(directory), holder], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
        probe = FileLiveness(directory)
        assert not probe.gone(holder)
        os.kill(proc.pid, signal.SIGSTOP)  # stalled, not dead
        assert not probe.gone(holder)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert probe.gone(holder)
        assert probe.gone(holder_identity("never-started"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
