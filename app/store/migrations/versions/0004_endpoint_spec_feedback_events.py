"""Endpoint specs (traffic, logging; versioned apart from the runtime config), feedback on logged
predictions, and the outbox of platform events (CloudEvents).

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("endpoints") as batch:
        batch.add_column(sa.Column("spec", sa.JSON(), nullable=False, server_default="{}"))
        batch.add_column(sa.Column("spec_version", sa.Integer(), nullable=False, server_default="1"))
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("endpoint", sa.String(128), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("instance", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("label", sa.JSON(), nullable=True),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("reward", sa.Float(), nullable=True),
        sa.Column("timestamp", _TS, nullable=False),
        sa.Column("received_at", _TS, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
    )
    op.create_index("ix_feedback_request", "feedback", ["endpoint", "request_id", "instance", "id"])
    op.create_index("ix_feedback_received_at", "feedback", ["received_at"])
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(64), nullable=False, unique=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("source", sa.String(256), nullable=False),
        sa.Column("subject", sa.String(256), nullable=False),
        sa.Column("time", _TS, nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("published_at", _TS, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text(), nullable=True),
    )
    op.create_index("ix_events_type", "events", ["type"])
    op.create_index("ix_events_time", "events", ["time"])
    op.create_index("ix_events_unpublished", "events", ["published_at", "id"])


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("feedback")
    with op.batch_alter_table("endpoints") as batch:
        batch.drop_column("spec_version")
        batch.drop_column("spec")
