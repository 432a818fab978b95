"""compensations.confirmed_by: which engine was told of a confirmation in memory

A run polls the ledger twice a second for changes made elsewhere; the
confirmations its own process tracked reached it in memory already, and
during a large rollback they were nearly all a poll read (measured at
100,000 events: ~10,000 rows and ~100 ms per poll, in the run's loop).
Tagging them lets the poll leave them out in SQL.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 20:15:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("compensations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("confirmed_by", sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("compensations", schema=None) as batch_op:
        batch_op.drop_column("confirmed_by")
