"""Instance versions: both files of a replaced instance stay on disk, named in the history.

Revision ID: 0004_instance_versions
Revises: 0003_results
"""
from alembic import op
import sqlalchemy as sa

revision = "0004_instance_versions"
down_revision = "0003_results"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instance_history") as batch:
        batch.add_column(sa.Column("old_path", sa.Text(), nullable=True))
        batch.add_column(sa.Column("new_path", sa.Text(), nullable=True))
        batch.add_column(sa.Column("new_size", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("current", sa.String(8), nullable=False, server_default="new"))
    # the server default only fills existing rows; the models give the value from now on
    with op.batch_alter_table("instance_history") as batch:
        batch.alter_column("current", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("instance_history") as batch:
        batch.drop_column("current")
        batch.drop_column("new_size")
        batch.drop_column("new_path")
        batch.drop_column("old_path")
