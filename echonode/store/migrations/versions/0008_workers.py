"""Workers: liveness and the model each holds.

Revision ID: 0008_workers
Revises: 0007_result_versions

``workers``: one row per worker process, refreshed every ``queue.heartbeat_s``; the
dispatcher dispatches when a live analysis worker holds a model, so receivers need no
model bundles of their own.
"""
from alembic import op
import sqlalchemy as sa

revision = "0008_workers"
down_revision = "0007_result_versions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("worker_id", sa.String(128), primary_key=True),
        sa.Column("queues", sa.String(64), nullable=False),
        sa.Column("device", sa.String(32), nullable=False),
        sa.Column("model_available", sa.Boolean(), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("last_seen", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_workers_last_seen", "workers", ["last_seen"])


def downgrade() -> None:
    op.drop_index("ix_workers_last_seen", table_name="workers")
    op.drop_table("workers")
