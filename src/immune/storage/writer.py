"""The synchronous half of the write path: rows, SQL and transactions.

These functions run in a worker thread (``asyncio.to_thread``), one batch per
transaction. Events are the hot path: their rows are built as plain tuples
straight from the struct's attributes and sent with one ``executemany`` of a
prepared ``INSERT ... ON CONFLICT DO NOTHING`` (SQLite) or one ``COPY`` into a
staging table (PostgreSQL), so a repeated event id is stored once.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import msgspec
import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from immune.events import Alert, Event
from immune.storage.engine import is_transient
from immune.storage.models import MAX_DEAD_LETTER_PAYLOAD

logger = logging.getLogger(__name__)

Row = tuple[Any, ...]

EVENT_COLUMNS = (
    "id agent_id host ts kind pid ppid uid euid comm exe argv path addr port "
    "family outcome severity sensor data received_at"
).split()
ALERT_COLUMNS = (
    "id ts rule title severity plugin agent_id host event_ids techniques "
    "description count data"
).split()
#: Columns an alert stored again overwrites; ts, rule and plugin stay as first
#: stored.
ALERT_UPDATES = "title severity agent_id host event_ids techniques description "
ALERT_UPDATES += "count data"
DEAD_LETTER_COLUMNS = "received_at source reason payload payload_size sha256".split()
JSON_COLUMNS = frozenset({"argv", "data", "event_ids", "techniques"})
#: Events inserted by one statement on SQLite (21 columns each: well under
#: SQLite's limit of 32,766 parameters a statement).
ROWS_PER_INSERT = 32
#: Temporary table events are copied into on PostgreSQL.
STAGING = "events_staging"
#: Longest ``source`` of a dead letter (the column's length).
MAX_SOURCE = 256

_encode_struct = msgspec.json.Encoder().encode


def _json(obj: Any) -> str:
    option = orjson.OPT_NON_STR_KEYS
    return orjson.dumps(obj, default=msgspec.to_builtins, option=option).decode()


@dataclass(frozen=True)
class Statements:
    """The SQL of the write path, in the driver's paramstyle.

    On PostgreSQL, events are copied (``COPY``) into a temporary table and
    moved from there with one ``INSERT ... SELECT ... ON CONFLICT``: twice
    as fast as an ``executemany`` of single-row inserts.
    """

    dialect: str
    events: str
    alerts: str
    dead_letters: str
    events_staging: str = ""
    events_copy: str = ""
    events_multi: str = ""

    @classmethod
    def for_dialect(cls, name: str) -> Statements:
        """Build the statements for a dialect (``sqlite`` or ``postgresql``)."""

        def values(columns: Sequence[str]) -> str:
            if name != "postgresql":
                return ", ".join("?" for _ in columns)
            # psycopg sends str as text; JSONB columns need the cast.
            return ", ".join(
                "CAST(%s AS JSONB)" if col in JSON_COLUMNS else "%s" for col in columns
            )

        def insert(table: str, columns: Sequence[str]) -> str:
            names = ", ".join(columns)
            return f"INSERT INTO {table} ({names}) VALUES ({values(columns)})"

        updates = ", ".join(f"{col} = excluded.{col}" for col in ALERT_UPDATES.split())
        alerts = insert("alerts", ALERT_COLUMNS)
        alerts += f" ON CONFLICT (id) DO UPDATE SET {updates}"
        dead_letters = insert("dead_letters", DEAD_LETTER_COLUMNS)
        if name != "postgresql":
            events = insert("events", EVENT_COLUMNS) + " ON CONFLICT (id) DO NOTHING"
            row = f"({values(EVENT_COLUMNS)})"
            multi = events.replace(row, ", ".join([row] * ROWS_PER_INSERT))
            return cls(name, events, alerts, dead_letters, events_multi=multi)
        names = ", ".join(EVENT_COLUMNS)
        return cls(
            name,
            events=f"INSERT INTO events ({names}) SELECT {names} FROM {STAGING}"
            " ON CONFLICT (id) DO NOTHING",
            alerts=alerts,
            dead_letters=dead_letters,
            events_staging=f"CREATE TEMPORARY TABLE IF NOT EXISTS {STAGING}"
            " (LIKE events) ON COMMIT DELETE ROWS",
            events_copy=f"COPY {STAGING} ({names}) FROM STDIN",
        )


def event_rows(pending: Iterable[tuple[int, Event]]) -> list[Row]:
    """Rows of the events table, from (received_at, event) pairs."""
    dumps = orjson.dumps
    encode = _encode_struct
    return [
        (
            e.id,
            e.agent_id,
            e.host,
            e.ts,
            e.kind,
            e.pid,
            e.ppid,
            e.uid,
            e.euid,
            e.comm,
            e.exe,
            None if e.argv is None else dumps(e.argv).decode(),
            e.path,
            e.addr,
            e.port,
            e.family,
            e.outcome,
            e.severity,
            e.sensor,
            encode(e).decode(),
            received_at,
        )
        for received_at, e in pending
    ]


def alert_row(a: Alert) -> Row:
    """The row of the alerts table for one alert."""
    return (
        a.id,
        a.ts,
        a.rule,
        a.title,
        a.severity,
        a.plugin,
        a.agent_id,
        a.host,
        _json(a.event_ids),
        _json(a.techniques),
        a.description,
        a.count,
        _json(a.data),
    )


def clean_text(text: str) -> str:
    """Text any database accepts: no NUL, no lone surrogates."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\x00", "\\x00")


def dead_letter_row(received_at: int, source: str, reason: str, payload: bytes) -> Row:
    """The row of a dead letter: the payload cut to 64 KiB, its size and hash."""
    return (
        received_at,
        clean_text(source)[:MAX_SOURCE],
        clean_text(reason),
        payload[:MAX_DEAD_LETTER_PAYLOAD],
        len(payload),
        hashlib.sha256(payload).hexdigest(),
    )


def payload_of(obj: Any) -> bytes:
    """JSON bytes of whatever could not be stored, or its repr at worst."""
    try:
        if isinstance(obj, msgspec.Struct):
            return _encode_struct(obj)
        return orjson.dumps(
            obj, default=msgspec.to_builtins, option=orjson.OPT_NON_STR_KEYS
        )
    except (TypeError, ValueError):
        return repr(obj).encode("utf-8", "backslashreplace")


def db_reason(error: BaseException) -> str:
    """The database's own words for an error, without the SQL and parameters."""
    orig = getattr(error, "orig", None)
    if orig is not None:
        return f"{type(orig).__name__}: {orig}"
    return f"{type(error).__name__}: {error}"


@dataclass
class Batch:
    """Rows taken from the pending buffers for one write."""

    events: list[tuple[int, Event]] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    dead_letters: list[Row] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.events) + len(self.alerts) + len(self.dead_letters)


@dataclass
class Outcome:
    """What became of a batch.

    ``done`` holds the rows dealt with: written, or refused by the database
    by themselves, which are also in ``rejected`` as ``(table, item,
    reason)``. ``interrupted`` is set when the database became unavailable
    while rows were written one by one: the rows not in ``done`` must be
    tried again.
    """

    events_written: int = 0
    events_duplicate: int = 0
    alerts_written: int = 0
    dead_letters_written: int = 0
    done: Batch = field(default_factory=Batch)
    rejected: list[tuple[str, Any, str]] = field(default_factory=list)
    batch_error: str | None = None
    interrupted: BaseException | None = None


def _insert_events(conn: sa.Connection, sql: Statements, rows: list[Row]) -> int:
    if sql.dialect != "postgresql":
        return _insert_events_sqlite(conn, sql, rows)
    conn.exec_driver_sql(sql.events_staging)
    dbapi = conn.dialect.loaded_dbapi
    driver: Any = conn.connection.driver_connection
    try:
        with driver.cursor() as cursor:
            with cursor.copy(sql.events_copy) as copy:
                for row in rows:
                    copy.write_row(row)
    except dbapi.Error as err:
        # Raised by psycopg itself, not through SQLAlchemy: wrap it the same
        # way so it is told apart as a row's fault or the database's.
        raise sa.exc.DBAPIError.instance(
            sql.events_copy, None, err, dbapi.Error
        ) from err
    return conn.exec_driver_sql(sql.events).rowcount


def _insert_events_sqlite(conn: sa.Connection, sql: Statements, rows: list[Row]) -> int:
    # Rows go ROWS_PER_INSERT to a statement: the sqlite3 module releases and
    # takes back the interpreter lock around every statement it steps, and
    # taking it back waits for the event loop's thread, so one statement per
    # row would make the writer wait on the hive once per event.
    whole = len(rows) - len(rows) % ROWS_PER_INSERT
    flat = [
        tuple(chain.from_iterable(rows[start : start + ROWS_PER_INSERT]))
        for start in range(0, whole, ROWS_PER_INSERT)
    ]
    written = conn.exec_driver_sql(sql.events_multi, flat).rowcount if flat else 0
    if whole < len(rows):
        written += conn.exec_driver_sql(sql.events, rows[whole:]).rowcount
    return written


def _write(conn: sa.Connection, sql: Statements, batch: Batch, out: Outcome) -> None:
    if batch.events:
        written = max(_insert_events(conn, sql, event_rows(batch.events)), 0)
        out.events_written += written
        out.events_duplicate += len(batch.events) - written
    if batch.alerts:
        conn.exec_driver_sql(sql.alerts, [alert_row(a) for a in batch.alerts])
        out.alerts_written += len(batch.alerts)
    if batch.dead_letters:
        conn.exec_driver_sql(sql.dead_letters, batch.dead_letters)
        out.dead_letters_written += len(batch.dead_letters)


def write_batch(engine: Engine, sql: Statements, batch: Batch) -> Outcome:
    """Write a batch in one transaction, or row by row if that fails.

    Raises:
        Exception: the database is unavailable (see :func:`is_transient`);
            nothing of the batch was written.
    """
    out = Outcome()
    try:
        with engine.begin() as conn:
            _write(conn, sql, batch, out)
    except Exception as exc:
        if is_transient(exc):
            raise
        out = Outcome(batch_error=db_reason(exc))
        logger.warning(
            "A batch of %d rows was refused (%s); writing its rows one by one.",
            len(batch),
            out.batch_error,
        )
        _write_one_by_one(engine, sql, batch, out)
    else:
        out.done = batch
    return out


def _singles(batch: Batch) -> Iterable[tuple[str, Any, Batch]]:
    for item in batch.events:
        yield "events", item, Batch(events=[item])
    for alert in batch.alerts:
        yield "alerts", alert, Batch(alerts=[alert])
    for row in batch.dead_letters:
        yield "dead_letters", row, Batch(dead_letters=[row])


def _write_one_by_one(
    engine: Engine, sql: Statements, batch: Batch, out: Outcome
) -> None:
    done = out.done
    lists: dict[str, Callable[[Any], None]] = {
        "events": done.events.append,
        "alerts": done.alerts.append,
        "dead_letters": done.dead_letters.append,
    }
    for table, item, single in _singles(batch):
        try:
            with engine.begin() as conn:
                _write(conn, sql, single, out)
        except Exception as exc:
            if is_transient(exc):
                out.interrupted = exc
                return
            out.rejected.append((table, item, db_reason(exc)))
        lists[table](item)
