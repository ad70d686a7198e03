"""Monitoring and the closed loop: monitors, their runs, alerts and retraining triggers.

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "monitors",
        sa.Column("endpoint", sa.String(128), primary_key=True),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("spec_version", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("next_run_at", _TS, nullable=True),
        sa.Column("last_run_id", sa.String(32), nullable=True),
    )
    op.create_table(
        "monitor_runs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("endpoint", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("job_id", sa.String(64), nullable=True),
        sa.Column("spec_version", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("model", sa.String(256), nullable=True),
        sa.Column("model_version", sa.String(64), nullable=True),
        sa.Column("window_since", _TS, nullable=True),
        sa.Column("window_until", _TS, nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("drift_detected", sa.Boolean(), nullable=True),
        sa.Column("drift", sa.JSON(), nullable=True),
        sa.Column("performance", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("finished_at", _TS, nullable=True),
    )
    op.create_index("ix_monitor_runs_endpoint", "monitor_runs", ["endpoint", "created_at"])
    op.create_table(
        "alerts",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("endpoint", sa.String(128), nullable=False),
        sa.Column("rule", sa.String(128), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("metric", sa.String(256), nullable=False),
        sa.Column("value", sa.JSON(), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("run_id", sa.String(32), nullable=True),
        sa.Column("fire_count", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("first_fired_at", _TS, nullable=False),
        sa.Column("last_fired_at", _TS, nullable=False),
        sa.Column("notified_at", _TS, nullable=True),
        sa.Column("deliveries", sa.JSON(), nullable=False),
        sa.Column("acked_by", sa.String(128), nullable=True),
        sa.Column("acked_at", _TS, nullable=True),
        sa.Column("resolved_at", _TS, nullable=True),
    )
    op.create_index("ix_alerts_endpoint", "alerts", ["endpoint", "status"])
    op.create_index("ix_alerts_fingerprint", "alerts", ["fingerprint", "status"])
    op.create_table(
        "retrain_triggers",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("endpoint", sa.String(128), nullable=False),
        sa.Column("policy", sa.String(32), nullable=False),
        sa.Column("reason", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("run_id", sa.String(32), nullable=True),
        sa.Column("job_id", sa.String(64), nullable=True),
        sa.Column("model", sa.String(256), nullable=True),
        sa.Column("champion_version", sa.String(64), nullable=True),
        sa.Column("candidate_version", sa.String(64), nullable=True),
        sa.Column("rollout_id", sa.String(32), nullable=True),
        sa.Column("steps", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("finished_at", _TS, nullable=True),
    )
    op.create_index("ix_retrain_triggers_endpoint", "retrain_triggers", ["endpoint", "status"])


def downgrade() -> None:
    for table in ("retrain_triggers", "alerts", "monitor_runs", "monitors"):
        op.drop_table(table)
