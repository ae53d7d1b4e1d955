"""Reads for the CLI and the API, and the small writes made at once.

Reads run on their own connections: on SQLite in WAL mode they see the last
committed batch while the hive writes the next. Agents, commands and plugin
state change rarely and are read back soon after, so they are written at
once rather than buffered like events.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from immune.events import SEVERITIES, SEVERITY_RANK
from immune.storage import models
from immune.storage.models import AGENT_STATUSES, COMMAND_STATES

AGENT_FIELDS = frozenset({"hostname", "os", "version", "sensors", "status", "data"})


def _limited(query: sa.Select[Any], limit: int | None) -> sa.Select[Any]:
    if limit is None:
        return query
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    return query.limit(limit)


def _dicts(engine: Engine, query: sa.Select[Any]) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(query).mappings()]


def events(
    engine: Engine,
    *,
    kind: str | None = None,
    agent_id: str | None = None,
    since_ns: int | None = None,
    until_ns: int | None = None,
    exe: str | None = None,
    pid: int | None = None,
    limit: int | None = 100,
) -> list[dict[str, Any]]:
    """Stored events as dicts (``immune.events.parse_event`` takes them)."""
    t = models.events
    query = sa.select(t.c.data).order_by(t.c.ts.desc(), t.c.id.desc())
    if kind is not None:
        query = query.where(t.c.kind == kind)
    if exe is not None:
        query = query.where(t.c.exe == exe)
    if pid is not None:
        query = query.where(t.c.pid == pid)
    if agent_id is not None:
        query = query.where(t.c.agent_id == agent_id)
    if since_ns is not None:
        query = query.where(t.c.ts >= since_ns)
    if until_ns is not None:
        query = query.where(t.c.ts < until_ns)
    with engine.connect() as conn:
        return list(conn.execute(_limited(query, limit)).scalars())


def alerts(
    engine: Engine,
    *,
    min_severity: str | None = None,
    agent_id: str | None = None,
    since_ns: int | None = None,
    limit: int | None = 100,
) -> list[dict[str, Any]]:
    """Stored alerts as dicts with the fields of :class:`immune.events.Alert`."""
    t = models.alerts
    query = sa.select(t).order_by(t.c.ts.desc(), t.c.id.desc())
    if min_severity is not None:
        if min_severity not in SEVERITY_RANK:
            msg = f"unknown severity {min_severity!r}; one of {', '.join(SEVERITIES)}"
            raise ValueError(msg)
        wanted = SEVERITIES[SEVERITY_RANK[min_severity] :]
        query = query.where(t.c.severity.in_(wanted))
    if agent_id is not None:
        query = query.where(t.c.agent_id == agent_id)
    if since_ns is not None:
        query = query.where(t.c.ts >= since_ns)
    return _dicts(engine, _limited(query, limit))


def dead_letters(engine: Engine, *, limit: int | None = 100) -> list[dict[str, Any]]:
    """Dead letters, newest first; ``truncated`` tells a cut payload."""
    t = models.dead_letters
    query = _limited(sa.select(t).order_by(t.c.id.desc()), limit)
    rows = _dicts(engine, query)
    for row in rows:
        row["payload"] = bytes(row["payload"])
        row["truncated"] = row["payload_size"] > len(row["payload"])
    return rows


def agents(engine: Engine) -> list[dict[str, Any]]:
    """Every known agent, by id."""
    return _dicts(engine, sa.select(models.agents).order_by(models.agents.c.id))


def commands(
    engine: Engine,
    *,
    agent_id: str | None = None,
    state: str | None = None,
    limit: int | None = 100,
) -> list[dict[str, Any]]:
    """Commands, newest first."""
    return commands_in(models.commands, engine, agent_id, state, limit)


def commands_in(
    t: sa.Table,
    engine: Engine,
    agent_id: str | None,
    state: str | None,
    limit: int | None,
) -> list[dict[str, Any]]:
    """Rows of a table of commands (``commands`` or ``response_commands``)."""
    query = sa.select(t).order_by(t.c.created.desc(), t.c.id.desc())
    if agent_id is not None:
        query = query.where(t.c.agent_id == agent_id)
    if state is not None:
        query = query.where(t.c.state == state)
    return _dicts(engine, _limited(query, limit))


def command(engine: Engine, command_id: str) -> dict[str, Any] | None:
    """One command by id, or None."""
    t = models.commands
    rows = _dicts(engine, sa.select(t).where(t.c.id == command_id))
    return rows[0] if rows else None


def counts(engine: Engine) -> dict[str, int]:
    """Rows per table."""
    tables = models.Base.metadata.sorted_tables
    query = sa.select(
        *(sa.select(sa.func.count()).select_from(t).scalar_subquery() for t in tables)
    )
    with engine.connect() as conn:
        row = conn.execute(query).one()
    return {t.name: int(n) for t, n in zip(tables, row, strict=True)}


def get_state(engine: Engine, plugin: str, key: str) -> tuple[bool, Any]:
    """``(found, value)`` of a plugin's key."""
    t = models.plugin_state
    query = sa.select(t.c.value).where(t.c.plugin == plugin, t.c.key == key)
    with engine.connect() as conn:
        row = conn.execute(query).first()
    return (False, None) if row is None else (True, row.value)


# Writes, each run in a transaction of its own by the store.


def _insert(conn: sa.Connection, table: sa.Table) -> Any:
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def check_status(status: str) -> None:
    if status not in AGENT_STATUSES:
        msg = f"agent status must be one of {', '.join(AGENT_STATUSES)}: {status!r}"
        raise ValueError(msg)


def check_state(state: str) -> None:
    if state not in COMMAND_STATES:
        msg = f"command state must be one of {', '.join(COMMAND_STATES)}: {state!r}"
        raise ValueError(msg)


def upsert_agent(
    conn: sa.Connection, agent_id: str, fields: dict[str, Any], now: int
) -> None:
    values = {"status": "online", **fields, "last_seen": now}
    stmt = _insert(conn, models.agents).values(id=agent_id, first_seen=now, **values)
    update = {name: stmt.excluded[name] for name in values}
    conn.execute(stmt.on_conflict_do_update(index_elements=["id"], set_=update))


def set_agent_status(conn: sa.Connection, agent_id: str, status: str) -> bool:
    t = models.agents
    stmt = sa.update(t).where(t.c.id == agent_id).values(status=status)
    return conn.execute(stmt).rowcount > 0


def add_command(conn: sa.Connection, values: dict[str, Any]) -> None:
    conn.execute(sa.insert(models.commands).values(values))


def update_command(
    conn: sa.Connection, command_id: str, values: dict[str, Any]
) -> bool:
    t = models.commands
    stmt = sa.update(t).where(t.c.id == command_id).values(values)
    return conn.execute(stmt).rowcount > 0


def put_state(conn: sa.Connection, plugin: str, key: str, value: Any, now: int) -> None:
    # JSON null, not SQL NULL: None is a value a plugin may keep.
    stored = sa.JSON.NULL if value is None else value
    stmt = _insert(conn, models.plugin_state).values(
        plugin=plugin, key=key, value=stored, updated=now
    )
    update = {"value": stmt.excluded.value, "updated": stmt.excluded.updated}
    conn.execute(
        stmt.on_conflict_do_update(index_elements=["plugin", "key"], set_=update)
    )
