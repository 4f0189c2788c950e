"""Audit trail: append-only audit events and the record of what was sent.

Revision ID: 0005_audit
Revises: 0003_results

UPDATE on ``audit_events`` is refused by a trigger (SQLite and PostgreSQL): an audit
record is never rewritten. DELETE stays possible for the audited retention command.
"""
from alembic import op
import sqlalchemy as sa

revision = "0005_audit"
down_revision = "0004_instance_versions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("occurred_at", sa.DateTime(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        sa.Column("event", sa.String(40), nullable=False),
        sa.Column("event_id", sa.String(16), nullable=False),
        sa.Column("action", sa.String(1), nullable=False),
        sa.Column("outcome", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=True),
        sa.Column("patient_key", sa.String(64), nullable=True),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sqlite_autoincrement=True,  # ids are never reused (they are the syslog sequenceId)
    )
    op.create_index("ix_audit_events_occurred_at", "audit_events", ["occurred_at"])
    op.create_index("ix_audit_events_event", "audit_events", ["event"])
    op.create_index("ix_audit_events_study_instance_uid", "audit_events", ["study_instance_uid"])
    op.create_index("ix_audit_events_patient_key", "audit_events", ["patient_key"])
    op.create_table(
        "audit_sent",
        sa.Column("event_pk", sa.Integer(),
                  sa.ForeignKey("audit_events.id", name="fk_audit_sent_event_pk_audit_events", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("sent_at", sa.DateTime(), nullable=False),
    )
    bind = op.get_bind()
    restrict_database_file(bind)
    if bind.dialect.name == "sqlite":
        op.execute("CREATE TRIGGER audit_events_immutable BEFORE UPDATE ON audit_events "
                   "BEGIN SELECT RAISE(ABORT, 'audit events are append-only'); END")
    elif bind.dialect.name == "postgresql":
        op.execute("CREATE FUNCTION audit_events_immutable() RETURNS trigger LANGUAGE plpgsql AS $$ "
                   "BEGIN RAISE EXCEPTION 'audit events are append-only'; END $$")
        op.execute("CREATE TRIGGER audit_events_immutable BEFORE UPDATE ON audit_events "
                   "FOR EACH ROW EXECUTE FUNCTION audit_events_immutable()")


def restrict_database_file(bind) -> None:
    """The audit messages carry patient identifiers: the SQLite file (its -wal/-shm files
    inherit the mode) becomes 0640; on PostgreSQL, PUBLIC gets no access to the tables."""
    import os
    if bind.dialect.name == "sqlite":
        path = bind.engine.url.database
        if path and path != ":memory:" and os.path.exists(path):
            for p in (path, path + "-wal", path + "-shm"):
                if os.path.exists(p):
                    os.chmod(p, 0o640)
    elif bind.dialect.name == "postgresql":
        op.execute("REVOKE ALL ON audit_events, audit_sent FROM PUBLIC")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_events_immutable")
    elif bind.dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_events_immutable ON audit_events")
        op.execute("DROP FUNCTION IF EXISTS audit_events_immutable()")
    op.drop_table("audit_sent")
    op.drop_index("ix_audit_events_patient_key", table_name="audit_events")
    op.drop_index("ix_audit_events_study_instance_uid", table_name="audit_events")
    op.drop_index("ix_audit_events_event", table_name="audit_events")
    op.drop_index("ix_audit_events_occurred_at", table_name="audit_events")
    op.drop_table("audit_events")
