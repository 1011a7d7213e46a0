"""Which keys a server can prove (domain/bundles/key_trust.py): from its own key, through
endorsements that verify, and nothing a database writer can add."""

from __future__ import annotations

from datetime import UTC, datetime

from controlplane.domain.bundles.key_trust import provable
from controlplane.domain.bundles.signing import Signer
from controlplane.domain.model.bundles import Endorsement, KeyState, SigningKey

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def row(signer: Signer, public: bytes | None = None) -> SigningKey:
    return SigningKey(signer.key_id, public or signer.public_key, KeyState.ACTIVE, NOW)


def endorse(endorser: Signer, endorsed: Signer) -> Endorsement:
    return Endorsement(endorsed.key_id, endorser.key_id, endorser.endorse(endorsed.public_key))


def ids(keys: list[SigningKey]) -> set[str]:
    return {k.key_id for k in keys}


def test_own_key_and_what_it_endorses_transitively() -> None:
    own, old, older, stranger = (Signer.generate() for _ in range(4))
    keys = [row(own), row(old), row(older), row(stranger)]
    trusted = provable({own.key_id: own.public_key}, keys, [endorse(own, old), endorse(old, older)])
    assert ids(trusted) == {own.key_id, old.key_id, older.key_id}


def test_what_a_database_writer_can_add_proves_nothing() -> None:
    own, stranger, other = Signer.generate(), Signer.generate(), Signer.generate()
    keys = [row(own), row(stranger), row(other)]
    endorsements = [
        # The stranger endorsing our key, and itself: made with its own private key.
        endorse(stranger, own),
        endorse(stranger, stranger),
        # A signature copied from another endorsement: it is over another public key.
        Endorsement(stranger.key_id, own.key_id, own.endorse(other.public_key)),
        # Garbage.
        Endorsement(other.key_id, own.key_id, b"\0" * 64),
    ]
    assert ids(provable({own.key_id: own.public_key}, keys, endorsements)) == {own.key_id}


def test_a_row_whose_public_key_was_swapped_is_not_the_endorsed_key() -> None:
    own, old, stranger = Signer.generate(), Signer.generate(), Signer.generate()
    swapped = SigningKey(old.key_id, stranger.public_key, KeyState.ACTIVE, NOW)
    assert ids(provable({own.key_id: own.public_key}, [row(own), swapped], [endorse(own, old)])) == {
        own.key_id
    }
    # Nor is an anchor whose row holds another public key.
    assert provable({own.key_id: own.public_key}, [row(own, stranger.public_key)], []) == []
