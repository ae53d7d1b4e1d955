"""Initial schema: agents, events, alerts, dead letters, commands, plugin state.

Revision ID: 3c9d3163a7b7
Revises:
Create Date: 2026-12-03 19:06:58.051733
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "3c9d3163a7b7"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# JSON on SQLite, JSONB on PostgreSQL; None is stored as SQL NULL.
JSON = sa.JSON(none_as_null=True).with_variant(
    postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
)
AGENT_STATUSES = "status IN ('online', 'offline', 'unknown')"
COMMAND_STATES = (
    "state IN ('pending', 'sent', 'acknowledged', 'succeeded', 'failed', 'timed_out')"
)


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column(
            "id", sa.String(length=128), nullable=False, comment="Agent identifier."
        ),
        sa.Column(
            "hostname", sa.String(length=256), nullable=True, comment="Host name."
        ),
        sa.Column(
            "os", sa.String(length=256), nullable=True, comment="Operating system."
        ),
        sa.Column(
            "version", sa.String(length=256), nullable=True, comment="Agent version."
        ),
        sa.Column("sensors", JSON, nullable=True, comment="Sensors in use (list)."),
        sa.Column(
            "status",
            sa.String(length=16),
            nullable=False,
            comment="online, offline or unknown.",
        ),
        sa.Column(
            "first_seen", sa.BigInteger(), nullable=False, comment="First contact (ns)."
        ),
        sa.Column(
            "last_seen",
            sa.BigInteger(),
            nullable=False,
            comment="Last registration or heartbeat.",
        ),
        sa.Column("data", JSON, nullable=True, comment="What else the agent reported."),
        sa.CheckConstraint(AGENT_STATUSES, name=op.f("ck_agents_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agents")),
        comment="Agents that registered with the hive.",
    )

    op.create_table(
        "alerts",
        sa.Column("id", sa.String(length=128), nullable=False, comment="Alert.id."),
        sa.Column(
            "ts", sa.BigInteger(), nullable=False, comment="When it was raised (ns)."
        ),
        sa.Column(
            "rule", sa.String(length=256), nullable=False, comment="Rule that fired."
        ),
        sa.Column(
            "title", sa.String(length=4096), nullable=False, comment="One-line summary."
        ),
        sa.Column(
            "severity",
            sa.String(length=16),
            nullable=False,
            comment="info to critical.",
        ),
        sa.Column(
            "plugin",
            sa.String(length=256),
            nullable=False,
            comment="Plugin that raised it.",
        ),
        sa.Column(
            "agent_id", sa.String(length=128), nullable=True, comment="Agent concerned."
        ),
        sa.Column(
            "host", sa.String(length=256), nullable=True, comment="Host concerned."
        ),
        sa.Column(
            "event_ids", JSON, nullable=False, comment="Events it rests on (list)."
        ),
        sa.Column(
            "techniques", JSON, nullable=False, comment="ATT&CK techniques (list)."
        ),
        sa.Column(
            "description", sa.Text(), nullable=False, comment="Longer explanation."
        ),
        sa.Column("count", sa.Integer(), nullable=False, comment="Times it was seen."),
        sa.Column("data", JSON, nullable=False, comment="Alert.data."),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alerts")),
        comment="Conclusions detections drew; stored again, updated.",
    )
    op.create_index("ix_alerts_severity", "alerts", ["severity"])
    op.create_index("ix_alerts_ts", "alerts", ["ts"])

    op.create_table(
        "commands",
        sa.Column("id", sa.String(length=128), nullable=False, comment="Command id."),
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
        sa.Column("args", JSON, nullable=False, comment="Arguments of the action."),
        sa.Column(
            "state",
            sa.String(length=16),
            nullable=False,
            comment="pending to timed_out.",
        ),
        sa.Column(
            "created",
            sa.BigInteger(),
            nullable=False,
            comment="When it was issued (ns).",
        ),
        sa.Column(
            "expires",
            sa.BigInteger(),
            nullable=True,
            comment="Deadline (ns); none when absent.",
        ),
        sa.Column(
            "updated",
            sa.BigInteger(),
            nullable=False,
            comment="Last state change (ns).",
        ),
        sa.Column("result", JSON, nullable=True, comment="What the agent answered."),
        sa.CheckConstraint(COMMAND_STATES, name=op.f("ck_commands_state")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_commands")),
        comment="Response actions sent to agents, and how they went.",
    )
    op.create_index("ix_commands_agent_id_state", "commands", ["agent_id", "state"])

    op.create_table(
        "dead_letters",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
            comment="Sequence number.",
        ),
        sa.Column(
            "received_at",
            sa.BigInteger(),
            nullable=False,
            comment="When it was refused (ns).",
        ),
        sa.Column(
            "source",
            sa.String(length=256),
            nullable=False,
            comment='Where it came from: an MQTT topic, "plugin:<name>", ...',
        ),
        sa.Column("reason", sa.Text(), nullable=False, comment="Why it was refused."),
        sa.Column(
            "payload",
            sa.LargeBinary(),
            nullable=False,
            comment="The first 64 KiB of the payload.",
        ),
        sa.Column(
            "payload_size",
            sa.BigInteger(),
            nullable=False,
            comment="Whole payload, in bytes.",
        ),
        sa.Column(
            "sha256",
            sa.String(length=64),
            nullable=False,
            comment="SHA-256 of the whole payload (hex).",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
        comment="Messages and rows that could not be used.",
    )

    op.create_table(
        "events",
        sa.Column("id", sa.String(length=128), nullable=False, comment="Event.id."),
        sa.Column(
            "agent_id",
            sa.String(length=128),
            nullable=False,
            comment="Agent that reported it.",
        ),
        sa.Column("host", sa.String(length=256), nullable=False, comment="Host name."),
        sa.Column(
            "ts", sa.BigInteger(), nullable=False, comment="When it happened (ns)."
        ),
        sa.Column(
            "kind", sa.String(length=32), nullable=False, comment="exec, connect, ..."
        ),
        sa.Column("pid", sa.Integer(), nullable=True, comment="Process id."),
        sa.Column("ppid", sa.Integer(), nullable=True, comment="Parent process id."),
        sa.Column("uid", sa.BigInteger(), nullable=True, comment="Real user id."),
        sa.Column("euid", sa.BigInteger(), nullable=True, comment="Effective uid."),
        sa.Column(
            "comm", sa.String(length=256), nullable=True, comment="Process name."
        ),
        sa.Column(
            "exe", sa.String(length=4096), nullable=True, comment="Executable path."
        ),
        sa.Column("argv", JSON, nullable=True, comment="Arguments (list)."),
        sa.Column("path", sa.String(length=4096), nullable=True, comment="File path."),
        sa.Column(
            "addr", sa.String(length=256), nullable=True, comment="Network address."
        ),
        sa.Column("port", sa.Integer(), nullable=True, comment="Network port."),
        sa.Column(
            "family", sa.String(length=8), nullable=True, comment="inet, inet6, unix."
        ),
        sa.Column(
            "outcome",
            sa.String(length=16),
            nullable=False,
            comment="allowed, blocked...",
        ),
        sa.Column(
            "severity",
            sa.String(length=16),
            nullable=False,
            comment="info to critical.",
        ),
        sa.Column(
            "sensor",
            sa.String(length=256),
            nullable=False,
            comment="Sensor that saw it.",
        ),
        sa.Column("data", JSON, nullable=False, comment="The whole event, as JSON."),
        sa.Column(
            "received_at",
            sa.BigInteger(),
            nullable=False,
            comment="When the hive got it (ns).",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
        comment="Host events as agents reported them.",
    )
    op.create_index("ix_events_agent_id_ts", "events", ["agent_id", "ts"])
    op.create_index("ix_events_kind_ts", "events", ["kind", "ts"])
    op.create_index("ix_events_ts", "events", ["ts"])

    op.create_table(
        "plugin_state",
        sa.Column("plugin", sa.String(length=256), nullable=False, comment="Plugin."),
        sa.Column("key", sa.Text(), nullable=False, comment="Its key."),
        sa.Column("value", JSON, nullable=False, comment="The value (JSON)."),
        sa.Column(
            "updated", sa.BigInteger(), nullable=False, comment="Last write (ns)."
        ),
        sa.PrimaryKeyConstraint("plugin", "key", name=op.f("pk_plugin_state")),
        comment="Small values plugins keep across restarts.",
    )


def downgrade() -> None:
    op.drop_table("plugin_state")
    op.drop_index("ix_events_ts", table_name="events")
    op.drop_index("ix_events_kind_ts", table_name="events")
    op.drop_index("ix_events_agent_id_ts", table_name="events")
    op.drop_table("events")
    op.drop_table("dead_letters")
    op.drop_index("ix_commands_agent_id_state", table_name="commands")
    op.drop_table("commands")
    op.drop_index("ix_alerts_ts", table_name="alerts")
    op.drop_index("ix_alerts_severity", table_name="alerts")
    op.drop_table("alerts")
    op.drop_table("agents")
