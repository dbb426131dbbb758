"""jobs.undispatched_since: when a queued job's task message has not been sent yet (since when).

Set when a job becomes queued (submit, requeue, reap), cleared once its message reached the
broker; the reaper re-sends jobs left undispatched (a broker that was down when a worker handed a
job back, or when the reaper requeued it). NULL on rows from before: they count as sent.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""
from alembic import op
import sqlalchemy as sa

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("undispatched_since", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("undispatched_since")
