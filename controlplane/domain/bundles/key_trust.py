"""Which signing keys a server may offer as trusted: only those it can prove.

Write access to the database must never make agents trust a key. A key row proves
nothing (anyone who can write the table can add one), so a server lists a key as
trusted — in `<data-dir>/trusted-keys.json` and in `ListSigningKeys`, where agents pin
keys at first contact — only when a chain of signatures the database cannot make leads
to it:

- the key this server signs with: its private half is in the server's configuration,
  never in the database;
- any key endorsed by a key already proven: an Ed25519 signature by the endorser over
  `b"controlplane.signing-key-endorsement.v1\\x00" + <the endorsed public key>`. Only a
  holder of the endorser's private key can make one, and it binds the public key (so
  its key id) byte for byte.

Endorsements are made when a server starts with `--cross-sign-key-file` (the key being
rotated out, or a replica's other key): its own key and that one endorse each other, so
replicas signing with either list both during a rolling restart. A key endorsed only by
an unproven key, or by nobody, is not listed, whatever its row says.
"""

from __future__ import annotations

from collections.abc import Iterable

from controlplane.domain.bundles.signing import key_id_of, verify_endorsement
from controlplane.domain.model.bundles import Endorsement, SigningKey


def provable(
    anchors: dict[str, bytes], keys: Iterable[SigningKey], endorsements: Iterable[Endorsement]
) -> list[SigningKey]:
    """The keys of `keys` reachable from `anchors` (key id -> public key, held outside
    the database) through endorsements that verify, in the order of `keys`. An anchor's
    row counts only if its public key is the anchor's own."""
    rows = {k.key_id: k for k in keys if key_id_of(k.public_key) == k.key_id}
    by_endorser: dict[str, list[Endorsement]] = {}
    for e in endorsements:
        by_endorser.setdefault(e.endorser_key_id, []).append(e)
    proven: dict[str, bytes] = {i: p for i, p in anchors.items() if i in rows and rows[i].public_key == p}
    frontier = list(proven)
    while frontier:
        endorser = frontier.pop()
        for e in by_endorser.get(endorser, []):
            row = rows.get(e.key_id)
            if row is None or e.key_id in proven:
                continue
            if verify_endorsement(proven[endorser], row.public_key, e.signature):
                proven[e.key_id] = row.public_key
                frontier.append(e.key_id)
    return [k for k in keys if k.key_id in proven]
