"""Playbook runs and the commands response follows.

Revision ID: f0fe44e97b21
Revises: 3c9d3163a7b7
Create Date: 2026-12-03 21:47:36.716487
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "f0fe44e97b21"
down_revision: str | Sequence[str] | None = "3c9d3163a7b7"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# JSON on SQLite, JSONB on PostgreSQL; None is stored as SQL NULL.
JSON = sa.JSON(none_as_null=True).with_variant(
    postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
)
RUN_STATES = "state IN ('running', 'done', 'failed', 'cancelled')"
RESPONSE_STATES = (
    "state IN ('dry_run', 'sent', 'acknowledged', 'succeeded', 'failed', "
    "'timed_out', 'refused')"
)


def upgrade() -> None:
    op.create_table(
        "playbook_runs",
        sa.Column("id", sa.String(length=128), nullable=False, comment="Run id."),
        sa.Column(
            "playbook", sa.String(length=256), nullable=False, comment="Playbook id."
        ),
        sa.Column(
            "alert_id",
            sa.String(length=128),
            nullable=True,
            comment="Alert that triggered it.",
        ),
        sa.Column(
            "rule", sa.String(length=256), nullable=True, comment="That alert's rule."
        ),
        sa.Column(
            "agents",
            JSON,
            nullable=False,
            comment="Agents concerned (list).",
        ),
        sa.Column(
            "dry_run", sa.Boolean(), nullable=False, comment="Commands not sent."
        ),
        sa.Column(
            "state", sa.String(length=16), nullable=False, comment="running, done..."
        ),
        sa.Column(
            "started", sa.BigInteger(), nullable=False, comment="When it started (ns)."
        ),
        sa.Column(
            "finished", sa.BigInteger(), nullable=True, comment="When it ended (ns)."
        ),
        sa.Column(
            "steps",
            JSON,
            nullable=False,
            comment="What each step did (list).",
        ),
        sa.CheckConstraint(
            RUN_STATES,
            name=op.f("ck_playbook_runs_state"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_playbook_runs")),
        comment="Playbooks run on alerts, step by step.",
    )
    with op.batch_alter_table("playbook_runs", schema=None) as batch_op:
        batch_op.create_index("ix_playbook_runs_alert_id", ["alert_id"], unique=False)
        batch_op.create_index("ix_playbook_runs_started", ["started"], unique=False)

    op.create_table(
        "response_commands",
        sa.Column("id", sa.String(length=128), nullable=False, comment="Command id."),
        sa.Column(
            "run_id",
            sa.String(length=128),
            nullable=True,
            comment="Playbook run, if any.",
        ),
        sa.Column(
            "alert_id", sa.String(length=128), nullable=True, comment="Alert behind it."
        ),
        sa.Column(
            "origin",
            sa.String(length=256),
            nullable=False,
            comment="Plugin that decided it.",
        ),
        sa.Column(
            "agent_id",
            sa.String(length=128),
            nullable=False,
            comment="Agent that must act.",
        ),
        sa.Column(
            "action",
            sa.String(length=256),
            nullable=False,
            comment="What to do (kill, ...).",
        ),
        sa.Column(
            "args",
            JSON,
            nullable=False,
            comment="Arguments of the action.",
        ),
        sa.Column(
            "state", sa.String(length=16), nullable=False, comment="sent to timed_out."
        ),
        sa.Column(
            "attempts", sa.Integer(), nullable=False, comment="Times it was sent."
        ),
        sa.Column(
            "first_id",
            sa.String(length=128),
            nullable=False,
            comment="Id of its first attempt.",
        ),
        sa.Column(
            "revert_of",
            sa.String(length=128),
            nullable=True,
            comment="Command it undoes.",
        ),
        sa.Column(
            "created",
            sa.BigInteger(),
            nullable=False,
            comment="When it was decided (ns).",
        ),
        sa.Column(
            "updated",
            sa.BigInteger(),
            nullable=False,
            comment="Last state change (ns).",
        ),
        sa.Column(
            "revert_at",
            sa.BigInteger(),
            nullable=True,
            comment="When it is undone unless renewed (ns).",
        ),
        sa.Column("error", sa.Text(), nullable=True, comment="Why it failed."),
        sa.Column(
            "result",
            JSON,
            nullable=True,
            comment="What the agent answered.",
        ),
        sa.CheckConstraint(
            RESPONSE_STATES,
            name=op.f("ck_response_commands_state"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_response_commands")),
        comment="Commands response decided, followed to their end.",
    )
    with op.batch_alter_table("response_commands", schema=None) as batch_op:
        batch_op.create_index("ix_response_commands_created", ["created"], unique=False)
        batch_op.create_index("ix_response_commands_run_id", ["run_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("response_commands", schema=None) as batch_op:
        batch_op.drop_index("ix_response_commands_run_id")
        batch_op.drop_index("ix_response_commands_created")

    op.drop_table("response_commands")
    with op.batch_alter_table("playbook_runs", schema=None) as batch_op:
        batch_op.drop_index("ix_playbook_runs_started")
        batch_op.drop_index("ix_playbook_runs_alert_id")

    op.drop_table("playbook_runs")
