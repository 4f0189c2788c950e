"""ingest: patients, studies, series, instances, instance history, analysis jobs

Revision ID: 0001_ingest
Revises:
"""
from alembic import op
import sqlalchemy as sa

revision = "0001_ingest"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "patients",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("issuer", sa.String(64), nullable=False),
        sa.Column("birth_date", sa.String(8), nullable=True),
        sa.Column("sex", sa.String(16), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_patients"),
        sa.UniqueConstraint("patient_id", "issuer", name="uq_patients_patient_id_issuer"),
    )
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("patient_pk", sa.Integer(), nullable=True),
        sa.Column("study_date", sa.String(8), nullable=True),
        sa.Column("study_time", sa.String(16), nullable=True),
        sa.Column("accession_number", sa.String(64), nullable=True),
        sa.Column("study_id", sa.String(16), nullable=True),
        sa.Column("study_description", sa.String(64), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("first_received_at", sa.DateTime(), nullable=False),
        sa.Column("last_received_at", sa.DateTime(), nullable=False),
        sa.Column("stable_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["patient_pk"], ["patients.id"], name="fk_studies_patient_pk_patients"),
        sa.PrimaryKeyConstraint("id", name="pk_studies"),
        sa.UniqueConstraint("study_instance_uid", name="uq_studies_study_instance_uid"),
    )
    op.create_index("ix_studies_patient_pk", "studies", ["patient_pk"])
    op.create_index("ix_studies_state", "studies", ["state"])
    op.create_index("ix_studies_last_received_at", "studies", ["last_received_at"])
    op.create_table(
        "series",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("study_pk", sa.Integer(), nullable=False),
        sa.Column("modality", sa.String(16), nullable=True),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("series_description", sa.String(64), nullable=True),
        sa.ForeignKeyConstraint(["study_pk"], ["studies.id"], name="fk_series_study_pk_studies"),
        sa.PrimaryKeyConstraint("id", name="pk_series"),
        sa.UniqueConstraint("series_instance_uid", name="uq_series_series_instance_uid"),
    )
    op.create_index("ix_series_study_pk", "series", ["study_pk"])
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("series_pk", sa.Integer(), nullable=False),
        sa.Column("study_pk", sa.Integer(), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("image_type", sa.String(128), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("columns", sa.Integer(), nullable=True),
        sa.Column("number_of_frames", sa.Integer(), nullable=True),
        sa.Column("frame_time_ms", sa.Float(), nullable=True),
        sa.Column("cine_rate", sa.Float(), nullable=True),
        sa.Column("photometric", sa.String(16), nullable=True),
        sa.Column("manufacturer", sa.String(64), nullable=True),
        sa.Column("model_name", sa.String(64), nullable=True),
        sa.Column("view_code", sa.String(64), nullable=True),
        sa.Column("view_name", sa.String(128), nullable=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("calling_ae", sa.String(16), nullable=True),
        sa.Column("replaced_count", sa.Integer(), nullable=False),
        sa.Column("decision", sa.String(8), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["series_pk"], ["series.id"], name="fk_instances_series_pk_series"),
        sa.ForeignKeyConstraint(["study_pk"], ["studies.id"], name="fk_instances_study_pk_studies"),
        sa.PrimaryKeyConstraint("id", name="pk_instances"),
        sa.UniqueConstraint("sop_instance_uid", name="uq_instances_sop_instance_uid"),
    )
    op.create_index("ix_instances_series_pk", "instances", ["series_pk"])
    op.create_index("ix_instances_study_pk", "instances", ["study_pk"])
    op.create_table(
        "instance_history",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("old_sha256", sa.String(64), nullable=False),
        sa.Column("new_sha256", sa.String(64), nullable=False),
        sa.Column("old_size", sa.BigInteger(), nullable=False),
        sa.Column("old_received_at", sa.DateTime(), nullable=True),
        sa.Column("old_calling_ae", sa.String(16), nullable=True),
        sa.Column("replaced_at", sa.DateTime(), nullable=False),
        sa.Column("calling_ae", sa.String(16), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_instance_history"),
    )
    op.create_index("ix_instance_history_sop_instance_uid", "instance_history", ["sop_instance_uid"])
    op.create_table(
        "analysis_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_pk", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("study_version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["study_pk"], ["studies.id"], name="fk_analysis_jobs_study_pk_studies"),
        sa.PrimaryKeyConstraint("id", name="pk_analysis_jobs"),
        sa.UniqueConstraint("study_pk", "study_version", name="uq_analysis_jobs_study_version"),
    )
    op.create_index("ix_analysis_jobs_study_pk", "analysis_jobs", ["study_pk"])
    op.create_index("ix_analysis_jobs_study_instance_uid", "analysis_jobs", ["study_instance_uid"])
    op.create_index("ix_analysis_jobs_state", "analysis_jobs", ["state"])


def downgrade() -> None:
    for table in ("analysis_jobs", "instance_history", "instances", "series", "studies", "patients"):
        op.drop_table(table)
