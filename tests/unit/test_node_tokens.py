"""Node tokens: signing, verification without the database, expiry, unknown keys,
rotation, and revocation floors fed from the rows the hub reads."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controlplane.domain.identity.node_tokens import (
    NodeRevocations,
    NodeTokens,
    RevocationTap,
    TokenKeyring,
    generate_private_pem,
    key_id,
    load_private,
    load_public,
)
from controlplane.domain.kernel.errors import InvalidArgument, Unauthenticated
from controlplane.domain.model.desired import ChangeKind, DesiredRow, FeedPosition, FeedSnapshot


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def tokens(clock: Clock, key: Ed25519PrivateKey | None = None, *verifying: Ed25519PrivateKey) -> NodeTokens:
    keyring = TokenKeyring(key or Ed25519PrivateKey.generate(), [k.public_key() for k in verifying])
    return NodeTokens(keyring, NodeRevocations(), timedelta(minutes=15), clock)


def test_round_trip() -> None:
    clock = Clock()
    t = tokens(clock)
    issued = t.issue("n-1", "default", 42)
    claims = t.verify(issued.token)
    assert (claims.node_id, claims.project, claims.revision) == ("n-1", "default", 42)
    assert issued.expires_at.timestamp() == clock.now + 900


def test_expiry_with_a_little_leeway() -> None:
    clock = Clock()
    t = tokens(clock)
    issued = t.issue("n-1", "default", 1)
    clock.now += 900 + 4
    t.verify(issued.token)
    clock.now += 2
    with pytest.raises(Unauthenticated, match="expired"):
        t.verify(issued.token)


def test_unknown_key_and_rotation() -> None:
    clock = Clock()
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    before = tokens(clock, old).issue("n-1", "default", 1).token
    with pytest.raises(Unauthenticated, match="unknown key"):
        tokens(clock, new).verify(before)
    rotated = tokens(clock, new, old)
    assert rotated.verify(before).node_id == "n-1"
    assert rotated.keyring.signing_kid == key_id(new.public_key())
    assert set(rotated.keyring.kids) == {key_id(old.public_key()), key_id(new.public_key())}


@pytest.mark.parametrize("token", ["", "garbage", "eyJ.eyJ.sig", "a.b.c.d"])
def test_garbage_is_unauthenticated(token: str) -> None:
    with pytest.raises(Unauthenticated):
        tokens(Clock()).verify(token)


def test_a_revocation_kills_tokens_issued_before_it() -> None:
    clock = Clock()
    t = tokens(clock)
    before = t.issue("n-1", "default", 9).token
    other = t.issue("n-2", "default", 9).token
    t.revocations.observe([DesiredRow("meta:n-1", 10, "default", ChangeKind.REVOKED)])
    with pytest.raises(Unauthenticated, match="revoked"):
        t.verify(before)
    t.verify(other)
    assert t.verify(t.issue("n-1", "default", 10).token).revision == 10
    # Floors only rise; other kinds of rows and keys are ignored.
    t.revocations.merge({"n-1": 3})
    t.revocations.observe([DesiredRow("meta:n-1", 20, "default", ChangeKind.NODE)])
    t.revocations.observe([DesiredRow("node:n-1", 30, "default", ChangeKind.ASSIGN)])
    assert t.revocations.floors == {"n-1": 10}


def test_the_tap_feeds_revocations_from_what_the_hub_reads() -> None:
    rows = [
        DesiredRow("meta:n-1", 5, "default", ChangeKind.REVOKED),
        DesiredRow("meta:n-2", 6, "default", ChangeKind.NODE),
    ]

    class Feed:
        async def position(self) -> FeedPosition:
            return FeedPosition(6, 0, "e")

        async def changes(self, after: int, upto: int) -> list[DesiredRow]:
            return rows

        async def snapshot(self) -> FeedSnapshot:
            return FeedSnapshot(FeedPosition(7, 0, "e"), [DesiredRow("meta:n-3", 7, "p", ChangeKind.REVOKED)])

    revocations = NodeRevocations()
    tap = RevocationTap(Feed(), revocations)

    async def run() -> None:
        assert (await tap.position()).head == 6
        assert await tap.changes(0, 6) == rows
        await tap.snapshot()

    asyncio.run(run())
    assert revocations.floors == {"n-1": 5, "n-3": 7}


def test_key_files() -> None:
    pem = generate_private_pem()
    private = load_private(pem, "test")
    assert key_id(load_public(pem, "test")) == key_id(private.public_key())
    with pytest.raises(InvalidArgument):
        load_private(b"not a key", "test")
    with pytest.raises(InvalidArgument):
        load_public(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "test")


def test_a_verified_token_is_not_verified_again_but_still_expires_and_revokes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reconnect storm costs dictionary lookups, yet expiry and revocation still bite."""
    clock = Clock()
    t = tokens(clock)
    token = t.issue("n-1", "default", 5).token
    assert t.verify(token).node_id == "n-1"
    calls = 0
    real = jwt.decode

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    for _ in range(100):
        t.verify(token)
    assert calls == 0
    t.revocations.merge({"n-1": 6})
    with pytest.raises(Unauthenticated, match="revoked"):
        t.verify(token)
    other = t.issue("n-2", "default", 5).token
    t.verify(other)
    assert calls == 1
    clock.now += 900 + 60
    with pytest.raises(Unauthenticated, match="expired"):
        t.verify(other)
