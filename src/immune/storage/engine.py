"""Engines for SQLite and PostgreSQL, set up the way the hive needs them.

SQLite runs in WAL mode so the CLI and the API can read while the hive
writes; writers take the write lock up front (``BEGIN IMMEDIATE``) so a busy
database makes them wait ``busy_timeout`` instead of failing half-way through
a transaction. PostgreSQL is reached through psycopg 3.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Engine, make_url

from immune.errors import StorageError

logger = logging.getLogger(__name__)

#: How long a SQLite connection waits for a lock before giving up, in seconds.
DEFAULT_BUSY_TIMEOUT = 5.0

_PG_DRIVERS = {"postgres", "postgresql", "postgresql+psycopg"}


def normalize_url(url: str | URL) -> URL:
    """Parse a database URL and pick the driver IMMUNE uses.

    ``postgresql://`` and ``postgres://`` mean psycopg 3
    (``postgresql+psycopg://``); ``sqlite:///path`` is a file.

    Args:
        url: a SQLAlchemy URL; only SQLite and PostgreSQL are supported.

    Raises:
        StorageError: the URL is malformed, names another database, or an
            in-memory SQLite database (the hive reads and writes through
            separate connections, which would each see their own).
    """
    try:
        parsed = make_url(url)
    except exc.ArgumentError as err:
        raise StorageError(f"invalid database URL {url!r}: {err}") from None
    if parsed.drivername in _PG_DRIVERS:
        return parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        if parsed.database in (None, "", ":memory:"):
            msg = "an in-memory SQLite database cannot be used: give a file path"
            raise StorageError(msg)
        return parsed
    shown = parsed.render_as_string(hide_password=True)
    msg = f"unsupported database {shown}: use sqlite:///PATH or postgresql://..."
    raise StorageError(msg)


def json_dumps(obj: Any) -> str:
    """Serialize a JSON column value (orjson, as text)."""
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS).decode()


def json_loads(value: Any) -> Any:
    """Deserialize a JSON column value.

    SQLite gives a JSON column NUMERIC affinity: a stored ``5`` comes back
    as the integer, not as text.
    """
    if isinstance(value, str | bytes):
        return orjson.loads(value)
    return value


def make_engine(
    url: str | URL,
    *,
    writer: bool = True,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
) -> Engine:
    """Create an engine for ``url``.

    Args:
        url: the database URL (see :func:`normalize_url`).
        writer: on SQLite, begin transactions with ``BEGIN IMMEDIATE`` so the
            write lock is taken (or waited for) before the first statement;
            readers use a plain, deferred ``BEGIN``.
        busy_timeout: seconds a SQLite connection waits for a lock; > 0.
    """
    parsed = normalize_url(url)
    kwargs: dict[str, Any] = {
        "json_serializer": json_dumps,
        "json_deserializer": json_loads,
    }
    if parsed.get_backend_name() == "postgresql":
        engine = sa.create_engine(parsed, pool_pre_ping=True, **kwargs)
    else:
        engine = sa.create_engine(parsed, **kwargs)
        _setup_sqlite(engine, writer=writer, busy_timeout_ms=int(busy_timeout * 1000))
    return engine


def _setup_sqlite(engine: Engine, *, writer: bool, busy_timeout_ms: int) -> None:
    begin = "BEGIN IMMEDIATE" if writer else "BEGIN"

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transactions out of the sqlite3 module's hands: it would not
        # begin one before DDL and it breaks SAVEPOINT; "begin" below does it.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql(begin)


def is_transient(error: BaseException) -> bool:
    """Whether a failed write may succeed later, unchanged.

    Locks, lost connections, a full disk or a missing table are the
    database's condition, not the rows' fault: the rows are kept and the
    write retried. Data and integrity errors, and Python errors while binding
    a value (an int too large for SQLite, say), are the fault of some row.
    """
    if isinstance(error, exc.DBAPIError):
        if error.connection_invalidated:
            return True
        if isinstance(error, exc.DataError | exc.IntegrityError):
            return False
        if isinstance(error, exc.ProgrammingError):
            # A server-side syntax or schema error carries an SQLSTATE; a
            # value the driver cannot bind does not.
            return getattr(error.orig, "sqlstate", None) is not None
        return True
    if isinstance(error, exc.StatementError):
        return False
    if isinstance(error, exc.SQLAlchemyError):
        # Pool timeouts, disconnections.
        return True
    return not isinstance(error, TypeError | ValueError | OverflowError)
