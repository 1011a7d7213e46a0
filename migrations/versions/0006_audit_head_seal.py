"""The audit chain head is sealed with the audit key (issue 5).

The migration cannot compute a seal (it does not hold the key): the head starts unsealed
and the next start (or, without one, the next transaction that records an audit entry)
seals it, behind an `audit.seal` entry saying so (controlplane/domain/audit/chain.py,
`extend`). A store has one such entry; a second one means a seal was removed.

So that undoing this migration and applying it again is not such a removal, the
downgrade keeps the head's seal aside — in a second audit_head row, `id` 2, `mac` the
seal and `seq` the head's seq then, which code from before 0006 never reads — and the
upgrade puts it back when the head has not moved since. When code from before 0006
wrote entries meanwhile, the head did move and its seal needs the key: the kept row
stays until the start checks it and seals the head without an entry (`reseal`).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

HEAD_ROW, KEPT_SEAL_ROW = 1, 2


def upgrade() -> None:
    with op.batch_alter_table("audit_head") as batch:
        batch.add_column(sa.Column("seal", sa.String(64), nullable=False, server_default=""))
    head = sa.table("audit_head", sa.column("id"), sa.column("seq"), sa.column("mac"), sa.column("seal"))
    conn = op.get_bind()
    rows = {r.id: r for r in conn.execute(sa.select(head.c.id, head.c.seq, head.c.mac))}
    current, kept = rows.get(HEAD_ROW), rows.get(KEPT_SEAL_ROW)
    if current is not None and kept is not None and kept.seq == current.seq:
        conn.execute(sa.update(head).where(head.c.id == HEAD_ROW).values(seal=kept.mac))
        conn.execute(sa.delete(head).where(head.c.id == KEPT_SEAL_ROW))


def downgrade() -> None:
    head = sa.table("audit_head", sa.column("id"), sa.column("seq"), sa.column("mac"), sa.column("seal"))
    conn = op.get_bind()
    current = conn.execute(sa.select(head.c.seq, head.c.seal).where(head.c.id == HEAD_ROW)).one_or_none()
    # An unsealed head keeps the seal an earlier downgrade kept, if any.
    if current is not None and current.seal:
        conn.execute(sa.delete(head).where(head.c.id == KEPT_SEAL_ROW))
        conn.execute(sa.insert(head).values(id=KEPT_SEAL_ROW, seq=current.seq, mac=current.seal))
    with op.batch_alter_table("audit_head") as batch:
        batch.drop_column("seal")
