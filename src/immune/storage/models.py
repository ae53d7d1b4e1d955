"""The hive's tables, as SQLAlchemy models.

Every constraint and index is named by :data:`NAMING_CONVENTION`, so
migrations can refer to them on any database. Times are integers of
nanoseconds since the epoch, as in events. JSON columns are ``JSON`` on
SQLite and ``JSONB`` on PostgreSQL. Column lengths follow the limits of the
structs in :mod:`immune.events`, so a validated event always fits.
"""

from __future__ import annotations

from typing import Annotated, Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

AGENT_STATUSES = ("online", "offline", "unknown")
COMMAND_STATES = (
    "pending",
    "sent",
    "acknowledged",
    "succeeded",
    "failed",
    "timed_out",
    "refused",
)
#: Dead-letter payloads are kept up to this many bytes (size and hash: whole).
MAX_DEAD_LETTER_PAYLOAD = 64 * 1024

#: SQL NULL for None (not the JSON ``null``), on both databases.
JsonValue = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")

# Reusable column types (warehouse style).
Ident = Annotated[str, mapped_column(String(128))]
ShortText = Annotated[str, mapped_column(String(256))]
LongText = Annotated[str, mapped_column(String(4096))]
Nanos = Annotated[int, mapped_column(BigInteger)]
Json = Annotated[Any, mapped_column(JsonValue)]


def _one_of(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({quoted})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Agent(Base):
    __tablename__ = "agents"
    __table_args__ = (
        CheckConstraint(_one_of("status", AGENT_STATUSES), name="status"),
        {"comment": "Agents that registered with the hive."},
    )

    id: Mapped[Ident] = mapped_column(primary_key=True, comment="Agent identifier.")
    hostname: Mapped[ShortText | None] = mapped_column(comment="Host name.")
    os: Mapped[ShortText | None] = mapped_column(comment="Operating system.")
    version: Mapped[ShortText | None] = mapped_column(comment="Agent version.")
    sensors: Mapped[Json | None] = mapped_column(comment="Sensors in use (list).")
    status: Mapped[str] = mapped_column(
        String(16), comment="online, offline or unknown."
    )
    first_seen: Mapped[Nanos] = mapped_column(comment="First contact (ns).")
    last_seen: Mapped[Nanos] = mapped_column(comment="Last registration or heartbeat.")
    data: Mapped[Json | None] = mapped_column(comment="What else the agent reported.")


class EventRow(Base):
    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_ts", "ts"),
        Index("ix_events_agent_id_ts", "agent_id", "ts"),
        Index("ix_events_kind_ts", "kind", "ts"),
        {"comment": "Host events as agents reported them."},
    )

    id: Mapped[Ident] = mapped_column(primary_key=True, comment="Event.id.")
    agent_id: Mapped[Ident] = mapped_column(comment="Agent that reported it.")
    host: Mapped[ShortText] = mapped_column(comment="Host name.")
    ts: Mapped[Nanos] = mapped_column(comment="When it happened (ns).")
    kind: Mapped[str] = mapped_column(String(32), comment="exec, connect, ...")
    pid: Mapped[int | None] = mapped_column(Integer, comment="Process id.")
    ppid: Mapped[int | None] = mapped_column(Integer, comment="Parent process id.")
    uid: Mapped[int | None] = mapped_column(BigInteger, comment="Real user id.")
    euid: Mapped[int | None] = mapped_column(BigInteger, comment="Effective uid.")
    comm: Mapped[ShortText | None] = mapped_column(comment="Process name.")
    exe: Mapped[LongText | None] = mapped_column(comment="Executable path.")
    argv: Mapped[Json | None] = mapped_column(comment="Arguments (list).")
    path: Mapped[LongText | None] = mapped_column(comment="File path.")
    addr: Mapped[ShortText | None] = mapped_column(comment="Network address.")
    port: Mapped[int | None] = mapped_column(Integer, comment="Network port.")
    family: Mapped[str | None] = mapped_column(String(8), comment="inet, inet6, unix.")
    outcome: Mapped[str] = mapped_column(String(16), comment="allowed, blocked...")
    severity: Mapped[str] = mapped_column(String(16), comment="info to critical.")
    sensor: Mapped[ShortText] = mapped_column(comment="Sensor that saw it.")
    data: Mapped[Json] = mapped_column(comment="The whole event, as JSON.")
    received_at: Mapped[Nanos] = mapped_column(comment="When the hive got it (ns).")


class AlertRow(Base):
    __tablename__ = "alerts"
    __table_args__ = (
        Index("ix_alerts_ts", "ts"),
        Index("ix_alerts_severity", "severity"),
        {"comment": "Conclusions detections drew; stored again, updated."},
    )

    id: Mapped[Ident] = mapped_column(primary_key=True, comment="Alert.id.")
    ts: Mapped[Nanos] = mapped_column(comment="When it was raised (ns).")
    rule: Mapped[ShortText] = mapped_column(comment="Rule that fired.")
    title: Mapped[LongText] = mapped_column(comment="One-line summary.")
    severity: Mapped[str] = mapped_column(String(16), comment="info to critical.")
    plugin: Mapped[ShortText] = mapped_column(comment="Plugin that raised it.")
    agent_id: Mapped[Ident | None] = mapped_column(comment="Agent concerned.")
    host: Mapped[ShortText | None] = mapped_column(comment="Host concerned.")
    event_ids: Mapped[Json] = mapped_column(comment="Events it rests on (list).")
    techniques: Mapped[Json] = mapped_column(comment="ATT&CK techniques (list).")
    description: Mapped[str] = mapped_column(Text, comment="Longer explanation.")
    count: Mapped[int] = mapped_column(Integer, comment="Times it was seen.")
    data: Mapped[Json] = mapped_column(comment="Alert.data.")


class DeadLetter(Base):
    __tablename__ = "dead_letters"
    __table_args__ = {"comment": "Messages and rows that could not be used."}

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
        comment="Sequence number.",
    )
    received_at: Mapped[Nanos] = mapped_column(comment="When it was refused (ns).")
    source: Mapped[ShortText] = mapped_column(
        comment='Where it came from: an MQTT topic, "plugin:<name>", ...'
    )
    reason: Mapped[str] = mapped_column(Text, comment="Why it was refused.")
    payload: Mapped[bytes] = mapped_column(
        LargeBinary, comment="The first 64 KiB of the payload."
    )
    payload_size: Mapped[Nanos] = mapped_column(comment="Whole payload, in bytes.")
    sha256: Mapped[str] = mapped_column(
        String(64), comment="SHA-256 of the whole payload (hex)."
    )


class Command(Base):
    __tablename__ = "commands"
    __table_args__ = (
        CheckConstraint(_one_of("state", COMMAND_STATES), name="state"),
        Index("ix_commands_agent_id_state", "agent_id", "state"),
        {"comment": "Response actions sent to agents, and how they went."},
    )

    id: Mapped[Ident] = mapped_column(primary_key=True, comment="Command id.")
    agent_id: Mapped[Ident] = mapped_column(comment="Agent that must act.")
    action: Mapped[ShortText] = mapped_column(comment="What to do (kill, ...).")
    args: Mapped[Json] = mapped_column(comment="Arguments of the action.")
    state: Mapped[str] = mapped_column(String(16), comment="pending to timed_out.")
    created: Mapped[Nanos] = mapped_column(comment="When it was issued (ns).")
    expires: Mapped[int | None] = mapped_column(
        BigInteger, comment="Deadline (ns); none when absent."
    )
    updated: Mapped[Nanos] = mapped_column(comment="Last state change (ns).")
    result: Mapped[Json | None] = mapped_column(comment="What the agent answered.")
    error: Mapped[str | None] = mapped_column(
        Text, comment="Why it failed or was refused."
    )
    origin: Mapped[ShortText | None] = mapped_column(comment="Plugin that issued it.")
    alert_id: Mapped[Ident | None] = mapped_column(comment="Alert it answers.")


class PluginState(Base):
    __tablename__ = "plugin_state"
    __table_args__ = {"comment": "Small values plugins keep across restarts."}

    plugin: Mapped[ShortText] = mapped_column(primary_key=True, comment="Plugin.")
    key: Mapped[str] = mapped_column(Text, primary_key=True, comment="Its key.")
    value: Mapped[Json] = mapped_column(comment="The value (JSON).")
    updated: Mapped[Nanos] = mapped_column(comment="Last write (ns).")


RUN_STATES = ("running", "done", "failed", "cancelled")
RESPONSE_STATES = (
    "dry_run",
    "sent",
    "acknowledged",
    "succeeded",
    "failed",
    "timed_out",
    "refused",
)


class PlaybookRun(Base):
    __tablename__ = "playbook_runs"
    __table_args__ = (
        CheckConstraint(_one_of("state", RUN_STATES), name="state"),
        Index("ix_playbook_runs_started", "started"),
        Index("ix_playbook_runs_alert_id", "alert_id"),
        {"comment": "Playbooks run on alerts, step by step."},
    )

    id: Mapped[Ident] = mapped_column(primary_key=True, comment="Run id.")
    playbook: Mapped[ShortText] = mapped_column(comment="Playbook id.")
    alert_id: Mapped[Ident | None] = mapped_column(comment="Alert that triggered it.")
    rule: Mapped[ShortText | None] = mapped_column(comment="That alert's rule.")
    agents: Mapped[Json] = mapped_column(comment="Agents concerned (list).")
    dry_run: Mapped[bool] = mapped_column(Boolean, comment="Commands not sent.")
    state: Mapped[str] = mapped_column(String(16), comment="running, done...")
    started: Mapped[Nanos] = mapped_column(comment="When it started (ns).")
    finished: Mapped[int | None] = mapped_column(
        BigInteger, comment="When it ended (ns)."
    )
    steps: Mapped[Json] = mapped_column(comment="What each step did (list).")


class ResponseCommand(Base):
    __tablename__ = "response_commands"
    __table_args__ = (
        CheckConstraint(_one_of("state", RESPONSE_STATES), name="state"),
        Index("ix_response_commands_run_id", "run_id"),
        Index("ix_response_commands_created", "created"),
        {"comment": "Commands response decided, followed to their end."},
    )

    id: Mapped[Ident] = mapped_column(primary_key=True, comment="Command id.")
    run_id: Mapped[Ident | None] = mapped_column(comment="Playbook run, if any.")
    alert_id: Mapped[Ident | None] = mapped_column(comment="Alert behind it.")
    origin: Mapped[ShortText] = mapped_column(comment="Plugin that decided it.")
    agent_id: Mapped[Ident] = mapped_column(comment="Agent that must act.")
    action: Mapped[ShortText] = mapped_column(comment="What to do (kill, ...).")
    args: Mapped[Json] = mapped_column(comment="Arguments of the action.")
    state: Mapped[str] = mapped_column(String(16), comment="sent to timed_out.")
    attempts: Mapped[int] = mapped_column(Integer, comment="Times it was sent.")
    first_id: Mapped[Ident] = mapped_column(comment="Id of its first attempt.")
    revert_of: Mapped[Ident | None] = mapped_column(comment="Command it undoes.")
    created: Mapped[Nanos] = mapped_column(comment="When it was decided (ns).")
    updated: Mapped[Nanos] = mapped_column(comment="Last state change (ns).")
    revert_at: Mapped[int | None] = mapped_column(
        BigInteger, comment="When it is undone unless renewed (ns)."
    )
    error: Mapped[str | None] = mapped_column(Text, comment="Why it failed.")
    result: Mapped[Json | None] = mapped_column(comment="What the agent answered.")


# The tables, for Core statements.
agents = Base.metadata.tables["agents"]
events = Base.metadata.tables["events"]
alerts = Base.metadata.tables["alerts"]
dead_letters = Base.metadata.tables["dead_letters"]
commands = Base.metadata.tables["commands"]
plugin_state = Base.metadata.tables["plugin_state"]
playbook_runs = Base.metadata.tables["playbook_runs"]
response_commands = Base.metadata.tables["response_commands"]
