"""The rollout state machine under random operator actions, node reports and clock ticks.

Hypothesis drives a rollout of random strategy and parameters over a small fake fleet
(`tests/support/rollouts.py`), interleaving ticks of random length with pauses,
resumes, cancels, rollbacks, approvals, rejections, ACTIVE reports, NACKs, outages,
heartbeats good and bad, pins, freeze windows, a revoked bundle and drivers taking over.
Each guarantee is one named check:

- LEGAL: every state change the machine makes is in the transition table, and a
  terminal rollout never changes again (operator actions on it are refused cleanly).
- IN-STEP: a node's desired state is only ever written by its own step (a blue-green
  traffic step writes every node), never by a step that has not started.
- ONCE: each step's desired state is written at most once, in step order.
- ONE-AT-A-TIME: steps before the current one are done, steps after it untouched, and
  at most one step is applying or baking.
- BUDGET: a rollout that is still running or succeeded has no more NACKs than allowed.
- DONE-MEANS-DONE: a succeeded rollout finished every step.
- ROLLED-BACK: after a rollback every node runs what it was meant to run before the
  rollout (cancel: every node not on the bundle when it was cancelled).
- SUCCEEDED: after success every target node that was not skipped is meant to run the
  bundle.
- TAKE-OVER: a new driver taking the lease over restarts at most the current step's bake;
  it writes nothing, moves no state and touches no node.

"Before" is an independent model: each node's effective desired state as the fake log
resolved it when the history began, not what the rollout recorded. The fleet starts in
every shape the log allows — a node's own key deciding, a selector assignment newer than
the node's key, a node key newer than the selector, a selector alone, nothing at all — so
a restore that writes back the wrong key's value is caught.
"""

from __future__ import annotations

from datetime import timedelta

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from controlplane.domain.kernel.errors import DomainError
from controlplane.domain.model.fleet import Health, NodeMetrics
from controlplane.domain.model.rollouts import (
    TERMINAL_STATES,
    TRANSITIONS,
    CanaryAnalysis,
    FreezeWindow,
    Gates,
    NodeState,
    Role,
    RolloutState,
    StepKind,
    StepState,
    Strategy,
)
from controlplane.domain.rollouts import actions, machine
from controlplane.domain.rollouts.run import IllegalTransition, Run
from tests.support.profiles import examples
from tests.support.rollouts import MID, NEW, OLD, T0, FakeFleet, fresh, make_run, make_spec, nodes, tick

BAD = NodeMetrics(Health.UNHEALTHY, error_rate=0.5, p99_latency_ms=900)
GOOD = NodeMetrics(Health.HEALTHY, error_rate=0.01, p99_latency_ms=20)
ACTORS = ("operator:alice", "operator:bob", "operator:carol")
# How a node's desired state stands before the rollout (see the module docstring).
SHAPES = ("own key", "selector over key", "key over selector", "selector alone", "nothing")
LIVE_STATES = (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.FAILED)


@st.composite
def specs(draw: st.DrawFn):  # type: ignore[no-untyped-def]
    strategy = draw(st.sampled_from(list(Strategy)))
    extra: dict[str, object] = {}
    if strategy is Strategy.ROLLING:
        extra["batch_size"] = draw(st.integers(1, 4))
    if strategy is Strategy.CANARY:
        extra["canary"] = CanaryAnalysis(
            min_sample=draw(st.integers(1, 3)), max_extensions=draw(st.integers(0, 2))
        )
    if strategy is Strategy.BLUE_GREEN:
        extra["traffic_steps"] = draw(st.sampled_from([(10, 50), (50,), ()]))
    return make_spec(
        strategy,
        bake_time=timedelta(seconds=draw(st.sampled_from([0, 2, 5]))),
        progress_deadline=timedelta(seconds=draw(st.sampled_from([20, 60]))),
        gate_failure_window=timedelta(seconds=draw(st.sampled_from([0, 5, 15]))),
        max_unavailable=draw(st.integers(0, 2)),
        max_failures=draw(st.integers(0, 2)),
        auto_rollback=draw(st.booleans()),
        # Most histories start without approvals, so they get far.
        approvals_required=draw(st.sampled_from([0, 0, 0, 1, 2])),
        gates=Gates(require_healthy=True, max_error_rate=draw(st.sampled_from([None, 0.1]))),
        **extra,
    )


class RolloutMachine(RuleBasedStateMachine):
    @initialize(spec=specs(), size=st.integers(1, 9), creator=st.sampled_from(ACTORS), data=st.data())
    def setup(self, spec, size, creator, data):  # type: ignore[no-untyped-def]
        self.ids = nodes(size)
        self.run: Run = make_run(spec, self.ids, created_by=creator)
        self.fleet = fleet = FakeFleet(self.ids)
        shapes = {n: data.draw(st.sampled_from(SHAPES), label=n) for n in self.ids}
        with_selector = [n for n in self.ids if "selector" in shapes[n]]
        for n in self.ids:
            if shapes[n] in ("selector alone", "nothing"):
                fleet.write([f"node:{n}"], None)
        if with_selector:
            fleet.assign_selector(MID, with_selector)
        for n in self.ids:
            if shapes[n] == "key over selector":
                fleet.write([f"node:{n}"], OLD)
        # The independent model: what each node was meant to run before the rollout.
        self.before = {n: self._desired(n) for n in self.ids}
        # At an operator's cancel: the nodes that ran the bundle then (they keep it).
        self.kept: set[str] | None = None
        self.now = T0
        self.approvers: set[str] = set()
        self.freeze: FreezeWindow | None = None
        self.problem = ""
        self.transitions: list[tuple[RolloutState, RolloutState]] = []
        self.max_step_seen = -1
        self.write_order: list[int] = []

    # -- the clock and the driver --------------------------------------------------------

    @rule(seconds=st.integers(0, 20))
    def advance_clock(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)
        before = len(self.fleet.written)
        try:
            self.run = self._tick()
        except IllegalTransition as e:  # pragma: no cover - the check that matters
            raise AssertionError(f"LEGAL: the driver made an illegal transition: {e}") from e
        self.write_order += [step for step, _ in self.fleet.written[before:]]

    @rule(ticks=st.integers(1, 8))
    def fleet_behaves(self, ticks: int) -> None:
        """A stretch where every node applies and beats healthily: progress happens."""
        for _ in range(ticks):
            self.fleet.converge_all(self.now, GOOD)
            self.advance_clock(2)

    def _tick(self) -> Run:
        before = len(self.fleet.transitions)
        new = tick(self.run, self.fleet, self.now, freeze=self.freeze, bundle_problem=self.problem)
        self.transitions += self.fleet.transitions[before:]
        event(f"state {new.state.value}")
        return new

    # -- operators ---------------------------------------------------------------------

    def _operator(self, action) -> None:  # type: ignore[no-untyped-def]
        run = self.run
        was = run.state
        try:
            action(run)
        except IllegalTransition as e:
            raise AssertionError(f"LEGAL: an operator action slipped past its guard: {e}") from e
        except DomainError:
            assert run.state is was, "a refused action changed the state"
            assert not run.writes and not run.restore
            return
        self.transitions += run.transitions
        self.fleet.perform(run, self.now)
        self.run = fresh(run)

    def _desired(self, node_id: str) -> tuple[str, int] | None:
        row = self.fleet.effective(node_id)
        return (row.digest, row.traffic_weight) if row is not None else None

    @rule()
    def pause(self) -> None:
        self._operator(lambda run: actions.pause(run, self.now, "operator"))

    # Targeted actions, so that many histories pause a live rollout or roll it back.

    @precondition(lambda self: self.run.state is RolloutState.RUNNING)
    @rule(ticks=st.integers(0, 3))
    def pause_running(self, ticks: int) -> None:
        self.pause()
        for _ in range(ticks):
            self.fleet_behaves(1)

    @precondition(lambda self: self.run.state in LIVE_STATES)
    @rule(roll=st.integers(0, 3))
    def roll_back_live(self, roll: int) -> None:
        if roll == 0:
            self.roll_back(0)

    @rule()
    def resume(self) -> None:
        self._operator(lambda run: actions.resume(run, self.now))

    # Rare actions take a die roll: most histories should get far before anything ends them.

    @rule(roll=st.integers(0, 9))
    def cancel(self, roll: int) -> None:
        if roll == 0:
            was_active = self.run.rollout.active
            on_bundle = {n for n, f in self.fleet.facts.items() if f.applied_digest == NEW}
            self._operator(lambda run: actions.cancel(run, self.now, "operator", self.fleet.facts))
            if was_active and self.run.state is RolloutState.CANCELLED:
                self.kept = on_bundle

    @rule(roll=st.integers(0, 9))
    def roll_back(self, roll: int) -> None:
        if roll == 0:
            self._operator(lambda run: actions.roll_back(run, self.now, "operator"))

    @rule(actor=st.sampled_from(ACTORS))
    def approve(self, actor: str) -> None:
        def act(run: Run) -> None:
            actions.approve(run, self.now, actor, self.approvers)
            self.approvers.add(actor)

        self._operator(act)

    @rule(roll=st.integers(0, 9))
    def reject(self, roll: int) -> None:
        if roll == 0:
            self._operator(lambda run: actions.reject(run, self.now, "operator:carol", "no"))

    # A window holds everything: on less often than off, so histories also get far.
    @rule(on=st.sampled_from([False, False, True]))
    def toggle_freeze(self, on: bool) -> None:
        self.freeze = (
            FreezeWindow("f", "default", "freeze", T0, T0 + timedelta(days=1), "why", "operator:x", T0)
            if on
            else None
        )

    @rule(roll=st.integers(0, 9))
    def a_new_driver_leads(self, roll: int) -> None:
        """A replica takes the lease over (the leader died): it may restart the bake and
        nothing else."""
        if roll == 0:
            run = self.run
            was = (run.rollout, [(s.index, s.state, s.revision) for s in run.steps], dict(run.nodes))
            machine.took_over(run, "a new driver leads the rollout")
            assert not (run.writes or run.restore or run.transitions), "TAKE-OVER: it decided something"
            now = (run.rollout, [(s.index, s.state, s.revision) for s in run.steps], dict(run.nodes))
            assert now == was, "TAKE-OVER: it changed more than the bake"
            self.run = fresh(run)

    @rule(roll=st.integers(0, 19))
    def revoke_bundle(self, roll: int) -> None:
        if roll == 0:
            self.problem = "bundle is revoked"

    # -- nodes -------------------------------------------------------------------------

    @rule(data=st.data())
    def node_converges(self, data: st.DataObject) -> None:
        if self.fleet.desired:
            node_id = data.draw(st.sampled_from(sorted(self.fleet.desired)))
            self.fleet.converge(node_id, self.now)

    @rule(data=st.data(), roll=st.integers(0, 4))
    def node_nacks(self, data: st.DataObject, roll: int) -> None:
        if self.fleet.desired and roll == 0:
            self.fleet.nack(data.draw(st.sampled_from(sorted(self.fleet.desired))), self.now)

    @rule(data=st.data(), good=st.booleans())
    def node_beats(self, data: st.DataObject, good: bool) -> None:
        self.fleet.beat(data.draw(st.sampled_from(self.ids)), self.now, GOOD if good else BAD)

    @rule(data=st.data(), roll=st.integers(0, 4))
    def node_goes_offline(self, data: st.DataObject, roll: int) -> None:
        if roll == 0:
            self.fleet.offline(data.draw(st.sampled_from(self.ids)))

    @rule(data=st.data(), roll=st.integers(0, 9))
    def node_pinned(self, data: st.DataObject, roll: int) -> None:
        if roll == 0:
            self.fleet.pins.add(data.draw(st.sampled_from(self.ids)))

    @rule()
    def everyone_converges_healthy(self) -> None:
        self.fleet.converge_all(self.now, GOOD)

    # -- the guarantees -----------------------------------------------------------------

    @invariant()
    def legal(self) -> None:
        seen_terminal = False
        for frm, to in self.transitions:
            assert not seen_terminal, f"LEGAL: {frm} -> {to} after a terminal state"
            assert to in TRANSITIONS.get(frm, frozenset()), f"LEGAL: {frm} -> {to}"
            seen_terminal = to in TERMINAL_STATES

    @invariant()
    def in_step(self) -> None:
        run = self.run
        for step, node_id in self.fleet.written:
            node = run.nodes[node_id]
            kind = run.steps[step].kind
            assert step <= run.rollout.current_step, f"IN-STEP: {node_id} written by future step {step}"
            if kind is StepKind.DEPLOY:
                assert node.step == step, f"IN-STEP: {node_id} (step {node.step}) written by step {step}"

    @invariant()
    def once(self) -> None:
        assert all(count == 1 for count in self.fleet.step_writes.values()), f"ONCE: {self.fleet.step_writes}"
        assert self.write_order == sorted(self.write_order), (
            f"ONCE: steps written out of order {self.write_order}"
        )

    @invariant()
    def one_at_a_time(self) -> None:
        run, current = self.run, self.run.rollout.current_step
        working = [s.index for s in run.steps if s.state in (StepState.APPLYING, StepState.BAKING)]
        assert len(working) <= 1, f"ONE-AT-A-TIME: {working}"
        for step in run.steps:
            if step.index < current:
                assert step.state is StepState.DONE, f"ONE-AT-A-TIME: step {step.index} is {step.state}"
            elif step.index > current:
                assert step.state is StepState.PENDING and not step.revision, f"step {step.index} ran early"
        for node in run.nodes.values():
            if node.state in (NodeState.ASSIGNED, NodeState.ACTIVE):
                assert run.steps[node.step].index <= current, f"IN-STEP: {node.node_id} ahead of its step"

    @invariant()
    def budget(self) -> None:
        run = self.run
        if run.state in (RolloutState.RUNNING, RolloutState.SUCCEEDED):
            failed = run.count((NodeState.FAILED,))
            assert failed <= run.spec.max_failures, f"BUDGET: {failed} > {run.spec.max_failures}"

    @invariant()
    def done_means_done(self) -> None:
        if self.run.state is RolloutState.SUCCEEDED:
            assert all(s.state is StepState.DONE for s in self.run.steps), "DONE-MEANS-DONE"

    @invariant()
    def rolled_back(self) -> None:
        run = self.run
        event(f"reached {run.state.value}")
        if run.state is RolloutState.ROLLED_BACK:
            kept: set[str] = set()
        elif run.state is RolloutState.CANCELLED:
            kept = self.kept or set()
        else:
            return
        for node_id in self.ids:
            if node_id in self.fleet.pins:
                continue  # pinned: left alone by the rollout and its restore
            node = run.nodes[node_id]
            now = self._desired(node_id)
            if node_id in kept and node.touched and node.role is Role.TARGET:
                assert now is not None and now[0] == NEW, f"ROLLED-BACK: {node_id} lost the bundle it ran"
                continue
            assert now == self.before[node_id], (
                f"ROLLED-BACK: {node_id} is meant to run {now}, had {self.before[node_id]} "
                f"before the rollout ({run.state.value})"
            )

    @invariant()
    def succeeded(self) -> None:
        run = self.run
        if run.state is not RolloutState.SUCCEEDED:
            return
        for node in run.nodes.values():
            if node.role is Role.TARGET and node.state is not NodeState.SKIPPED:
                if node.node_id in self.fleet.pins:
                    continue
                now = self._desired(node.node_id)
                assert now is not None and now[0] == NEW, f"SUCCEEDED: {node.node_id} is meant to run {now}"


RolloutMachine.TestCase.settings = settings(max_examples=examples(300), stateful_step_count=80, deadline=None)
TestRolloutMachine = RolloutMachine.TestCase
