"""Pipeline tables: interpretations, study embeddings, job dispatch bookkeeping.

Revision ID: 0003_results
Revises: 0002_outbox
"""
from alembic import op
import sqlalchemy as sa

revision = "0003_results"
down_revision = "0002_outbox"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "interpretations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("analysis_jobs.id", name="fk_interpretations_job_id_analysis_jobs"),
                  nullable=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("model_sha256", sa.String(64), nullable=False),
        sa.Column("demo", sa.Boolean(), nullable=False),
        sa.Column("interpretation", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("job_id", name="uq_interpretations_job_id"),
    )
    op.create_index("ix_interpretations_study_instance_uid", "interpretations", ["study_instance_uid"])
    op.create_index("ix_interpretations_created_at", "interpretations", ["created_at"])
    op.create_table(
        "study_embeddings",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("patient_key", sa.String(64), nullable=False),
        sa.Column("study_date", sa.String(8), nullable=False),
        sa.Column("model_sha256", sa.String(64), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("study_instance_uid", "model_sha256", name="uq_study_embeddings_study_model"),
    )
    op.create_index("ix_study_embeddings_patient_key", "study_embeddings", ["patient_key"])
    op.create_table(
        "job_dispatch",
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("analysis_jobs.id", name="fk_job_dispatch_job_id_analysis_jobs"),
                  primary_key=True),
        sa.Column("dispatches", sa.Integer(), nullable=False),
        sa.Column("dispatched_at", sa.DateTime(), nullable=True),
        sa.Column("dispatched_by", sa.String(128), nullable=True),
        sa.Column("task_id", sa.String(64), nullable=True),
        sa.Column("worker", sa.String(128), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("job_dispatch")
    op.drop_index("ix_study_embeddings_patient_key", table_name="study_embeddings")
    op.drop_table("study_embeddings")
    op.drop_index("ix_interpretations_created_at", table_name="interpretations")
    op.drop_index("ix_interpretations_study_instance_uid", table_name="interpretations")
    op.drop_table("interpretations")
