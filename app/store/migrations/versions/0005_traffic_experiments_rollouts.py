"""Traffic experiments: the variant of each feedback row, bandit arms (the rewards each
variant of an endpoint has earned), A/B tests and canary rollouts.

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("feedback") as batch:
        batch.add_column(sa.Column("variant", sa.String(128), nullable=True))
    op.create_table(
        "bandit_arms",
        sa.Column("endpoint", sa.String(128), primary_key=True),
        sa.Column("variant", sa.String(128), primary_key=True),
        sa.Column("n", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("reward_sum", sa.Float(), nullable=False, server_default="0"),
        sa.Column("reward_sq_sum", sa.Float(), nullable=False, server_default="0"),
        sa.Column("updated_at", _TS, nullable=False),
    )
    op.create_table(
        "abtests",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("endpoint", sa.String(128), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("stopped_at", _TS, nullable=True),
    )
    op.create_index("ix_abtests_endpoint", "abtests", ["endpoint", "status"])
    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("endpoint", sa.String(128), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("baseline", sa.String(64), nullable=False),
        sa.Column("candidate", sa.String(64), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("step_started_at", _TS, nullable=True),
        sa.Column("decisions", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("finished_at", _TS, nullable=True),
    )
    op.create_index("ix_rollouts_endpoint", "rollouts", ["endpoint", "status"])


def downgrade() -> None:
    op.drop_table("rollouts")
    op.drop_table("abtests")
    op.drop_table("bandit_arms")
    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("variant")
