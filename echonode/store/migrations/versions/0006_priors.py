"""Priors ledger: earlier studies fetched from the PACS, once per EchoCLIP-R weights.

Revision ID: 0006_priors
Revises: 0003_results
"""
from alembic import op
import sqlalchemy as sa

revision = "0006_priors"
down_revision = "0005_audit"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "prior_studies",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("model_sha256", sa.String(64), nullable=False),
        sa.Column("patient_key", sa.String(64), nullable=False),
        sa.Column("study_date", sa.String(8), nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("clips", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(128), nullable=True),
        sa.Column("lease_until", sa.DateTime(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("study_instance_uid", "model_sha256", name="uq_prior_studies_study_model"),
    )
    op.create_index("ix_prior_studies_patient_key", "prior_studies", ["patient_key"])
    op.create_index("ix_prior_studies_state", "prior_studies", ["state"])


def downgrade() -> None:
    op.drop_index("ix_prior_studies_state", table_name="prior_studies")
    op.drop_index("ix_prior_studies_patient_key", table_name="prior_studies")
    op.drop_table("prior_studies")
