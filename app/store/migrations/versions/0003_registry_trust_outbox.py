"""Trust and approvals of model versions, with the artifact's sha256, and the outbox of
registry mutations (intent, MLflow call, completion) that a restart finishes or rolls back.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "model_trust",
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("version", sa.String(16), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("trusted_by", sa.String(128), nullable=False),
        sa.Column("trusted_at", _TS, nullable=False),
    )
    op.create_table(
        "model_approvals",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.String(16), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("approved_by", sa.String(128), nullable=False),
        sa.Column("approved_at", _TS, nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
    )
    op.create_index("ix_model_approvals_version", "model_approvals", ["model", "version"])
    op.create_table(
        "registry_ops",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("op", sa.String(32), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.String(16), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("finished_at", _TS, nullable=True),
    )
    op.create_index("ix_registry_ops_state", "registry_ops", ["state"])
    op.create_index("ix_registry_ops_model", "registry_ops", ["model", "state"])


def downgrade() -> None:
    op.drop_index("ix_registry_ops_model", "registry_ops")
    op.drop_index("ix_registry_ops_state", "registry_ops")
    op.drop_table("registry_ops")
    op.drop_index("ix_model_approvals_version", "model_approvals")
    op.drop_table("model_approvals")
    op.drop_table("model_trust")
