"""The agent's spool: events kept on disk until the hive has stored them.

Every event the agent sees is appended to a SQLite file, in order, and
deleted only when the hive sends a receipt for it. So events survive a
broker outage, a hive outage and an agent restart. The spool is bounded:
when it is full the oldest events are dropped, and the number dropped is
kept in the file, counted and reported in heartbeats, so a loss is never
silent.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from pathlib import Path

from immune.config import state_dir
from immune.errors import ImmuneError

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, event BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS commands_seen (
    id TEXT PRIMARY KEY, expires INTEGER NOT NULL
);
"""


class SpoolError(ImmuneError):
    """The spool file cannot be opened or written."""


def default_path(agent_id: str) -> Path:
    """Where the spool of ``agent_id`` lives unless ``[agent] spool`` says
    (in :func:`immune.config.state_dir`)."""
    return state_dir() / f"agent-{agent_id}.spool"


class Spool:
    """A bounded, ordered, on-disk queue of encoded events.

    Args:
        path: the SQLite file (made with its directory, mode 0600), or
            ``:memory:``.
        max_events: the most events held; appending beyond drops the oldest.

    Raises:
        SpoolError: the file cannot be opened.
    """

    def __init__(self, path: str | Path, max_events: int) -> None:
        self.path = str(path)
        self.max_events = max_events
        self._lock: int | None = None
        if self.path != ":memory:":
            self._lock = _lock(self.path)
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                Path(self.path).touch(mode=0o600, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None)
            # WAL and NORMAL: a commit costs no fsync, a power cut can lose
            # the last moments but never corrupts the file.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            self._unlock()
            msg = f"cannot open the spool {self.path}: {exc}; set [agent] spool"
            raise SpoolError(msg) from None
        self._count = self._scalar("SELECT count(*) FROM spool")
        self.dropped = self._counter("dropped")

    def __len__(self) -> int:
        return self._count

    def _scalar(self, sql: str, *args: object) -> int:
        row = self._db.execute(sql, args).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def _counter(self, name: str) -> int:
        return self._scalar("SELECT value FROM counters WHERE name = ?", name)

    def append(self, events: list[bytes]) -> int:
        """Add encoded events at the end; returns how many old ones were dropped."""
        if not events:
            return 0
        try:
            with self._transaction():
                self._db.executemany(
                    "INSERT INTO spool (event) VALUES (?)", ((e,) for e in events)
                )
                self._count += len(events)
                return self._trim()
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot write the spool {self.path}: {exc}") from None

    def _trim(self) -> int:
        excess = self._count - self.max_events
        if excess <= 0:
            return 0
        self._db.execute(
            "DELETE FROM spool WHERE seq IN "
            "(SELECT seq FROM spool ORDER BY seq LIMIT ?)",
            (excess,),
        )
        self._count -= excess
        self.dropped += excess
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES ('dropped', ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (self.dropped,),
        )
        return excess

    def read(
        self, after: int, *, max_events: int, max_bytes: int
    ) -> list[tuple[int, bytes]]:
        """The oldest events with a sequence number above ``after``.

        Returns at least one event when there is one, then as many as fit in
        ``max_events`` and ``max_bytes``.
        """
        rows = self._db.execute(
            "SELECT seq, event FROM spool WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, max_events),
        ).fetchall()
        taken: list[tuple[int, bytes]] = []
        size = 0
        for seq, event in rows:
            size += len(event) + 1
            if taken and size > max_bytes:
                break
            taken.append((seq, bytes(event)))
        return taken

    def first_seq(self) -> int:
        """The sequence number of the oldest event (0 when empty)."""
        return self._scalar("SELECT min(seq) FROM spool")

    def remove(self, first: int, last: int) -> int:
        """Delete the events numbered ``first`` to ``last``; returns how many."""
        try:
            cursor = self._db.execute(
                "DELETE FROM spool WHERE seq BETWEEN ? AND ?", (first, last)
            )
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot write the spool {self.path}: {exc}") from None
        self._count -= cursor.rowcount
        return cursor.rowcount

    def remember_command(self, command_id: str, expires_ns: int) -> None:
        """Keep a command's id until it expires, so a replay is refused even
        after the agent restarts."""
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO commands_seen (id, expires) VALUES (?, ?)",
                (command_id, expires_ns),
            )
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot write the spool {self.path}: {exc}") from None

    def remembered_commands(self, now_ns: int) -> dict[str, int]:
        """The ids of commands seen that have not expired, with their expiry."""
        self._db.execute("DELETE FROM commands_seen WHERE expires <= ?", (now_ns,))
        rows = self._db.execute("SELECT id, expires FROM commands_seen").fetchall()
        return {str(i): int(e) for i, e in rows}

    def close(self) -> None:
        self._db.close()
        self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the file releases its lock
            self._lock = None

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


def _lock(path: str) -> int:
    """Hold ``<path>.lock`` for the life of the spool: one agent per spool.

    Two agents on one spool would each count what the other added and
    removed, and receipt each other's events.
    """
    lock_path = f"{path}.lock"
    try:
        Path(lock_path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        msg = f"cannot open the spool's lock {lock_path}: {exc}; set [agent] spool"
        raise SpoolError(msg) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        msg = (
            f"the spool {path} is in use by another agent on this host; stop it, "
            "or give this one its own [agent] spool and agent id"
        )
        raise SpoolError(msg) from None
    return fd


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
