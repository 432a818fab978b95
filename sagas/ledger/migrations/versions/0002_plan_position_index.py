"""index rollback_items (rollback_id, position)

A run re-reads its plan from its last known position twice a second (late
items, other workers); without this index that read walks the whole plan.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 10:40:00
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rollback_items", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_rollback_items_rollback_id_position"),
            ["rollback_id", "position"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("rollback_items", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rollback_items_rollback_id_position"))
