"""submission tokens bound to leases; login rate limit in the database

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("assignments", sa.Column("submission_token", sa.String(64), nullable=True))
    op.create_index("ix_assignments_submission_token", "assignments", ["submission_token"], unique=True)
    op.create_table(
        "login_attempts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_login_attempts_key_at", "login_attempts", ["key_hash", "at"])
    op.create_index("ix_login_attempts_at", "login_attempts", ["at"])


def downgrade() -> None:
    op.drop_table("login_attempts")
    op.drop_index("ix_assignments_submission_token", table_name="assignments")
    # a plain ALTER TABLE ... DROP COLUMN (SQLite >= 3.35): a batch copy of the table would
    # trip the judgments' foreign key on a database that holds data
    op.drop_column("assignments", "submission_token")
