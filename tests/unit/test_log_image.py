"""The hub's image of the desired-state log (`watch/image.py`), alone: no hub, no
streams, no loop. Rows go in as the MemoryFeed writes them."""

from __future__ import annotations

from controlplane.domain.kernel.labels import Selector, meta_key, node_key, route_key, selector_key
from controlplane.domain.model.desired import ChangeKind, DesiredRow, FeedPosition, FeedSnapshot
from controlplane.watch.image import LogImage
from tests.support.memfeed import MemoryFeed

PROD = selector_key("p", Selector.parse("env=prod"))
EVERY = selector_key("p", Selector.parse("*"))


def image_of(feed: MemoryFeed) -> LogImage:
    image = LogImage()
    for row in feed.history:
        image.remember(row)
    image.position = feed.head
    return image


def test_a_row_older_than_the_one_held_changes_nothing() -> None:
    image = LogImage()
    newer = DesiredRow(node_key("a"), 5, "p", ChangeKind.ASSIGN, digest="d5")
    older = DesiredRow(node_key("a"), 3, "p", ChangeKind.ASSIGN, digest="d3")
    assert image.remember(newer)
    assert not image.remember(older)
    assert image.latest[node_key("a")].digest == "d5"


def test_a_node_is_known_from_its_routing_row_until_it_is_revoked() -> None:
    feed = MemoryFeed()
    feed.node("a", {"env": "prod"})
    image = image_of(feed)
    assert image.node("a") == ("p", {"env": "prod"})
    assert image.node("b") is None
    feed.revoke("a")
    image = image_of(feed)
    assert image.node("a") is None and image.effective("a") is None


def test_a_node_runs_its_own_assignment_over_an_older_selector_and_a_newer_selector_over_it() -> None:
    feed = MemoryFeed()
    feed.node("a", {"env": "prod"})
    feed.assign((PROD,), "sel-1")
    feed.assign((node_key("a"),), "own")
    image = image_of(feed)
    assert image.keys_for("p", "a", {"env": "prod"}) == {node_key("a"), route_key("a"), PROD}
    effective = image.effective("a")
    assert effective is not None and effective.digest == "own"
    feed.assign((PROD,), "sel-2")
    effective = image_of(feed).effective("a")
    assert effective is not None and effective.digest == "sel-2"


def test_a_pin_wins_over_every_newer_row() -> None:
    feed = MemoryFeed()
    feed.node("a", {"env": "prod"})
    feed.assign((node_key("a"),), "pinned", pinned=True)
    feed.assign((PROD,), "newer")
    feed.assign((EVERY,), "newest")
    effective = image_of(feed).effective("a")
    assert effective is not None and effective.digest == "pinned"


def test_a_selector_reaches_only_the_labels_it_matches() -> None:
    feed = MemoryFeed()
    feed.node("a", {"env": "prod"})
    feed.node("b", {"env": "dev"})
    feed.assign((PROD,), "d1")
    image = image_of(feed)
    assert PROD in image.keys_for("p", "a", {"env": "prod"})
    assert PROD not in image.keys_for("p", "b", {"env": "dev"})
    assert PROD not in image.keys_for("other", "a", {"env": "prod"}), "a selector is per project"
    assert image.effective("b") is None


def test_the_floor_forgets_buried_tombstones_and_their_selectors_only() -> None:
    feed = MemoryFeed()
    feed.node("a", {"env": "prod"})
    feed.assign((PROD,), "d1")
    feed.unassign((PROD,))
    feed.assign((node_key("a"),), "kept")
    image = image_of(feed)
    assert PROD in image.keys_for("p", "a", {"env": "prod"})
    image.forget_below(feed.head + 1)
    assert PROD not in image.latest and PROD not in image.keys_for("p", "a", {"env": "prod"})
    assert image.latest[node_key("a")].digest == "kept", "a live assignment is never forgotten"
    assert image.floor == feed.head + 1
    image.forget_below(1)
    assert image.floor == feed.head + 1, "the floor only rises"


def test_changed_at_is_the_newest_revision_of_the_keys_or_the_routing_row() -> None:
    feed = MemoryFeed()
    relabelled = feed.node("a", {"env": "prod"})
    image = image_of(feed)
    keys = image.keys_for("p", "a", {"env": "prod"})
    assert image.changed_at(keys, "a") == relabelled
    assigned = feed.assign((node_key("a"),), "d1")
    feed.assign((node_key("b"),), "elsewhere")
    image = image_of(feed)
    assert image.changed_at(image.keys_for("p", "a", {"env": "prod"}), "a") == assigned
    assert meta_key("a") in image.latest


def test_load_replaces_the_whole_image() -> None:
    feed = MemoryFeed()
    feed.node("a", {"env": "prod"})
    feed.assign((PROD,), "d1")
    image = image_of(feed)
    image.load(FeedSnapshot(FeedPosition(7, 2, "epoch-2"), []))
    assert (image.position, image.floor, image.epoch) == (7, 2, "epoch-2")
    assert image.latest == {} and image.node("a") is None
    assert PROD not in image.keys_for("p", "a", {"env": "prod"})


def test_keys_for_a_label_set_follow_the_selectors_as_they_appear_and_go() -> None:
    """The matching selectors are remembered per label set: a selector written or buried
    later must still be seen by the next node with those labels."""
    image = LogImage()
    image.remember(DesiredRow(PROD, 1, "p", ChangeKind.ASSIGN, digest="d1"))
    labels = {"env": "prod"}
    assert image.keys_for("p", "a", labels) == {node_key("a"), route_key("a"), PROD}
    image.remember(DesiredRow(EVERY, 2, "p", ChangeKind.ASSIGN, digest="d2"))
    assert image.keys_for("p", "b", dict(labels)) == {node_key("b"), route_key("b"), PROD, EVERY}
    image.remember(DesiredRow(EVERY, 3, "p", ChangeKind.UNASSIGN))
    image.forget_below(4)
    assert image.keys_for("p", "c", dict(labels)) == {node_key("c"), route_key("c"), PROD}
    # Each call's set is the caller's own: the hub adds to a stream's keys.
    keys = image.keys_for("p", "d", labels)
    keys.add("extra")
    assert "extra" not in image.keys_for("p", "d", labels)
    assert image.keys_for("q", "e", labels) == {node_key("e"), route_key("e")}
