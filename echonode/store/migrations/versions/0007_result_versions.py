"""Result versions, job lease tokens, time-bounded retries.

Revision ID: 0007_result_versions
Revises: 0005_audit

* ``interpretations``: the study version a result covers and the UIDs of its SR, so the
  SR of a later version can name the one it replaces (Predecessor Documents Sequence).
* ``job_dispatch``: ``lease_token`` (the random token of the worker that owns a running
  job: heartbeat and finish need it), ``retry_at`` / ``failing_since`` (a job that hit a
  transient failure waits until ``retry_at``; it fails once ``failing_since`` is older
  than ``queue.retry_for_s``).
* ``outbox``: ``failing_since`` (first failed attempt since the row was last made due):
  delivery gives up after ``delivery.retry_for_s``, not after a count.
"""
from alembic import op
import sqlalchemy as sa

revision = "0007_result_versions"
down_revision = "0006_priors"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("interpretations") as b:
        b.add_column(sa.Column("study_version", sa.Integer(), nullable=True))
        b.add_column(sa.Column("sr_sop_instance_uid", sa.String(64), nullable=True))
        b.add_column(sa.Column("sr_series_instance_uid", sa.String(64), nullable=True))
    with op.batch_alter_table("job_dispatch") as b:
        b.add_column(sa.Column("lease_token", sa.String(32), nullable=True))
        b.add_column(sa.Column("retry_at", sa.DateTime(), nullable=True))
        b.add_column(sa.Column("failing_since", sa.DateTime(), nullable=True))
    with op.batch_alter_table("outbox") as b:
        b.add_column(sa.Column("failing_since", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox") as b:
        b.drop_column("failing_since")
    with op.batch_alter_table("job_dispatch") as b:
        b.drop_column("failing_since")
        b.drop_column("retry_at")
        b.drop_column("lease_token")
    with op.batch_alter_table("interpretations") as b:
        b.drop_column("sr_series_instance_uid")
        b.drop_column("sr_sop_instance_uid")
        b.drop_column("study_version")
