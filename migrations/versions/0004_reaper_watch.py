"""reaper_watch: when a reaper last read the database and since when without a gap, so that the
time the database was unreachable does not count as silence of running jobs' workers.

One row (id 1), written by every reaper pass; a gap between passes longer than half the heartbeat
timeout (an outage) restarts `watching_since`, and no job is reaped until a full timeout has been
watched since.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""
import datetime as dt

from alembic import op
import sqlalchemy as sa

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "reaper_watch",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("last_pass_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("watching_since", sa.DateTime(timezone=True), nullable=False),
    )
    now = dt.datetime.now(dt.timezone.utc)
    op.bulk_insert(table, [{"id": 1, "last_pass_at": now, "watching_since": now}])


def downgrade() -> None:
    op.drop_table("reaper_watch")
