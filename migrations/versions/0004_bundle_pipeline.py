"""Bundle pipeline: validation results, manifests, signatures, signing keys, risk, revocation and blob GC (issue 3)

Revision ID: 0004
Revises: 0003
"""

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Filled in by the work on this area; an empty step keeps the chain in order meanwhile.
    pass


def downgrade() -> None:
    pass
