"""How a node's desired state is resolved when a successful rollout has left a baseline
on its selector (`desired.resolve`, docs/protocol.md "Resolution"): pins first, then the
highest revision, except that a baseline row skips the nodes it excludes and yields to
the node's own key when that assigns the same bundle at the same weight."""

from __future__ import annotations

from controlplane.domain.kernel.labels import Selector, node_key, selector_key
from controlplane.domain.model.desired import ChangeKind, DesiredRow, resolve

PROD = selector_key("p", Selector.parse("env=prod"))


def own(node: str, revision: int, digest: str, weight: int = 100, pinned: bool = False) -> DesiredRow:
    return DesiredRow(
        node_key(node), revision, "p", ChangeKind.ASSIGN, digest=digest, traffic_weight=weight, pinned=pinned
    )


def baseline(revision: int, digest: str, exclude: frozenset[str] = frozenset()) -> DesiredRow:
    return DesiredRow(PROD, revision, "p", ChangeKind.ASSIGN, digest=digest, baseline="r-1", exclude=exclude)


def test_a_late_joiner_with_nothing_of_its_own_gets_the_baseline() -> None:
    row = baseline(10, "v2")
    assert resolve([None, row], "late") is row


def test_a_node_the_rollout_moved_keeps_its_own_row_so_the_success_sends_nothing() -> None:
    moved = own("a", 5, "v2")
    assert resolve([moved, baseline(10, "v2")], "a") is moved


def test_a_baseline_outranks_an_older_own_row_of_another_bundle() -> None:
    """A node relabelled into the selector, carrying an older rollout's row."""
    row = baseline(10, "v2")
    assert resolve([own("a", 5, "v1"), row], "a") is row
    # ... or of the same bundle at another weight (a blue-green standby, say).
    assert resolve([own("a", 5, "v2", weight=0), row], "a") is row


def test_an_excluded_node_resolves_as_if_the_baseline_were_not_there() -> None:
    refused = own("a", 5, "v2")
    other = own("b", 7, "v3")
    row = baseline(10, "v2", frozenset({"a", "b", "c"}))
    assert resolve([refused, row], "a") is refused
    assert resolve([other, row], "b") is other
    assert resolve([None, row], "c") is None
    assert resolve([None, row], "d") is row


def test_pins_still_win_and_a_later_plain_assignment_still_outranks() -> None:
    pin = own("a", 3, "v1", pinned=True)
    assert resolve([pin, baseline(10, "v2")], "a") is pin
    later = own("a", 11, "v3")
    assert resolve([later, baseline(10, "v2")], "a") is later
    tombstone = DesiredRow(node_key("a"), 12, "p", ChangeKind.UNASSIGN)
    row = baseline(10, "v2")
    assert resolve([tombstone, row], "a") is row
