"""drop index compensations (state)

Every query over compensations names the keys (claims, outcomes, operator
actions) or the rollback (plans, counts, the change poll by `updated_at`);
none is served by an index on `state` alone. SQLite, without statistics on
a new ledger, even preferred it for `key IN (...) AND state = ?` and walked
every pending row per claim. And every state change paid an index write.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 13:40:00
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("compensations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_compensations_state"))


def downgrade() -> None:
    with op.batch_alter_table("compensations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_compensations_state"), ["state"], unique=False)
