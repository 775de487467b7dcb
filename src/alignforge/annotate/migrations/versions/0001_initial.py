"""initial schema: users, sessions, items, assignments, judgments

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("username"),
    )
    op.create_table(
        "sessions",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_sessions_user_id", "sessions", ["user_id"])
    op.create_table(
        "items",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("uid", sa.String(128), nullable=False),
        sa.Column("prompt_json", sa.Text(), nullable=False),
        sa.Column("response_a", sa.Text(), nullable=False),
        sa.Column("response_b", sa.Text(), nullable=False),
        sa.Column("category", sa.String(128), nullable=True),
        sa.Column("is_gold", sa.Boolean(), nullable=False),
        sa.Column("gold_overall", sa.Integer(), nullable=True),
        sa.Column("source", sa.String(512), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("uid"),
    )
    op.create_table(
        "assignments",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("item_id", sa.Integer(), sa.ForeignKey("items.id"), nullable=False),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("swapped", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("leased_at", sa.DateTime(), nullable=False),
        sa.Column("lease_expires_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("item_id", "user_id", name="uq_assignment_item_user"),
    )
    op.create_index("ix_assignments_item_status", "assignments", ["item_id", "status"])
    op.create_index("ix_assignments_user_id", "assignments", ["user_id"])
    op.create_table(
        "judgments",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("submission_token", sa.String(64), nullable=False),
        sa.Column("item_id", sa.Integer(), sa.ForeignKey("items.id"), nullable=False),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("assignment_id", sa.Integer(), sa.ForeignKey("assignments.id"), nullable=False),
        sa.Column("overall", sa.Integer(), nullable=True),
        sa.Column("both_bad", sa.Boolean(), nullable=False),
        sa.Column("shown_overall", sa.String(16), nullable=False),
        sa.Column("helpfulness", sa.Integer(), nullable=True),
        sa.Column("harmlessness", sa.Integer(), nullable=True),
        sa.Column("fluency", sa.Integer(), nullable=True),
        sa.Column("prompt_quality", sa.String(32), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("swapped", sa.Boolean(), nullable=False),
        sa.Column("late", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("submission_token"),
        sa.UniqueConstraint("item_id", "user_id", name="uq_judgment_item_user"),
    )
    op.create_index("ix_judgments_item_id", "judgments", ["item_id"])
    op.create_index("ix_judgments_user_id", "judgments", ["user_id"])


def downgrade() -> None:
    op.drop_table("judgments")
    op.drop_table("assignments")
    op.drop_table("items")
    op.drop_table("sessions")
    op.drop_table("users")
