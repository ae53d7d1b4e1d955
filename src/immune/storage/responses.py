"""Playbook runs and the commands response follows: writes and reads.

A run is written when it starts and again when it ends; a command when it is
decided and at each change of state. Both are rare next to events, so they
are written at once (see :mod:`immune.storage.queries`).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from immune.storage import models, queries

_RUN_FIELDS = frozenset(c.name for c in models.playbook_runs.c)
_COMMAND_FIELDS = frozenset(c.name for c in models.response_commands.c)


def _check(fields: dict[str, Any], known: frozenset[str], what: str) -> None:
    unknown = set(fields) - known
    if unknown:
        raise TypeError(f"unknown {what} fields: {', '.join(sorted(unknown))}")


def add_run(conn: sa.Connection, values: dict[str, Any]) -> None:
    _check(values, _RUN_FIELDS, "playbook run")
    conn.execute(sa.insert(models.playbook_runs).values(values))


def update_run(conn: sa.Connection, run_id: str, values: dict[str, Any]) -> bool:
    _check(values, _RUN_FIELDS, "playbook run")
    t = models.playbook_runs
    return (
        conn.execute(sa.update(t).where(t.c.id == run_id).values(values)).rowcount > 0
    )


def add_command(conn: sa.Connection, values: dict[str, Any]) -> None:
    _check(values, _COMMAND_FIELDS, "response command")
    conn.execute(sa.insert(models.response_commands).values(values))


def update_command(
    conn: sa.Connection, command_id: str, values: dict[str, Any]
) -> bool:
    _check(values, _COMMAND_FIELDS, "response command")
    t = models.response_commands
    stmt = sa.update(t).where(t.c.id == command_id).values(values)
    return conn.execute(stmt).rowcount > 0


def runs(
    engine: Engine, *, playbook: str | None = None, limit: int | None = 100
) -> list[dict[str, Any]]:
    """Playbook runs, newest first, each with its ``commands`` (oldest first)."""
    t, c = models.playbook_runs, models.response_commands
    query = sa.select(t).order_by(t.c.started.desc(), t.c.id.desc())
    if playbook is not None:
        query = query.where(t.c.playbook == playbook)
    if limit is not None:
        query = query.limit(limit)
    with engine.connect() as conn:
        found = [dict(row) for row in conn.execute(query).mappings()]
        ids = [row["id"] for row in found]
        cmds = sa.select(c).where(c.c.run_id.in_(ids)).order_by(c.c.created, c.c.id)
        by_run: dict[str, list[dict[str, Any]]] = {}
        for cmd in conn.execute(cmds).mappings():
            by_run.setdefault(cmd["run_id"], []).append(dict(cmd))
    for row in found:
        row["commands"] = by_run.get(row["id"], [])
    return found


def commands(
    engine: Engine,
    *,
    agent_id: str | None = None,
    state: str | None = None,
    limit: int | None = 100,
) -> list[dict[str, Any]]:
    """Response commands, newest first."""
    table = models.response_commands
    return queries.commands_in(table, engine, agent_id, state, limit)
