"""Event rows written by a process of their own.

Building an event's row and inserting it costs the hive about as much as
everything else it does with the event, and in one process both share the
interpreter lock: the writer thread waits for the event loop at every
statement. :class:`WriterProcess` moves the events' share of a batch to a
child process with its own connection, so that the two halves run on two
cores. Events cross a pipe as one MessagePack message per batch; the child
answers with counts and the positions of rows the database refused. Two
batches may be in flight: the child reads the next while it writes one, and
answers in order.

Alerts and dead letters, a few rows per batch, are still written by the
calling thread, after the events: rows are written in order, events first,
as :class:`~immune.storage.store.Store` expects.

The child ignores SIGINT (Ctrl-C reaches the whole process group; the parent
decides when to stop) and leaves when its pipe closes, so it never outlives
the hive. If it dies, the write fails as the database being away would, and
the next write starts a new one.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sqlite3
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

import msgspec
from sqlalchemy import event as sa_event
from sqlalchemy.engine import URL, Engine

from immune.errors import StorageError
from immune.events import Event
from immune.metrics import Metrics
from immune.storage.engine import is_transient, make_engine
from immune.storage.writer import Batch, Outcome, Statements, db_reason, write_batch

logger = logging.getLogger(__name__)

#: Seconds the child has to leave after its pipe is closed.
STOP_TIMEOUT = 5.0

EventItems = list[tuple[int, Event]]


class WriterProcessError(StorageError):
    """The writer process could not write a batch (it is retried).

    Args:
        reason: what went wrong, in the database's own words where it spoke.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Reply(msgspec.Struct, array_like=True):
    """The child's answer for one batch of events."""

    written: int = 0
    duplicate: int = 0
    #: Events dealt with, from the start of the batch.
    done: int = 0
    #: (position in the batch, the database's reason) of refused events.
    rejected: list[tuple[int, str]] = msgspec.field(default_factory=list)
    batch_error: str | None = None
    #: The database went away while events were written one by one.
    interrupted: str | None = None
    #: Nothing was written: the database is unavailable (or a bug).
    failed: str | None = None


def _unchecked(struct: type[msgspec.Struct]) -> type[msgspec.Struct]:
    """A struct with the fields and defaults of ``struct`` but no constraints.

    Events were validated where they entered the hive (or made by the hive
    itself); the child must store them as they are, not judge them again.
    """
    fields: list[Any] = []
    for info in msgspec.structs.fields(struct):
        if info.required:
            fields.append((info.name, Any))
        else:
            fields.append((info.name, Any, info.default))
    return msgspec.defstruct(
        f"Unchecked{struct.__name__}",
        fields,
        kw_only=True,
        omit_defaults=True,
        gc=False,
    )


_encode = msgspec.msgpack.Encoder().encode
_UncheckedEvent: Any = _unchecked(Event)
_decode_events = msgspec.msgpack.Decoder(list[tuple[int, _UncheckedEvent]]).decode
_decode_reply = msgspec.msgpack.Decoder(_Reply).decode


def can_spawn() -> bool:
    """Whether a child can be started by spawning a new interpreter.

    A spawned child imports the parent's main script again; a program read
    from standard input (``python -``) has no script to import, so its
    store keeps the writer thread, and says so.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if getattr(main, "__spec__", None) is not None or path is None:
        return True
    if os.path.exists(path):
        return True
    logger.warning(
        "No writer process: the main program %s cannot be imported by a child; "
        "writing from a thread.",
        path,
    )
    return False


class WriterProcess:
    """A child process that writes batches of events to one database.

    Args:
        url: the database (a file or a server: the child opens its own).
        busy_timeout: seconds the child's SQLite connection waits for a lock.
        metrics: where ``storage.writer_restarts`` counts new children
            started after one died.
    """

    def __init__(
        self, url: URL, *, busy_timeout: float, metrics: Metrics | None = None
    ) -> None:
        self.url = url
        self.busy_timeout = busy_timeout
        self.metrics = metrics or Metrics()
        self._started = 0
        # Two batches may be in flight (see Store.flush): one thread sends
        # at a time (``_lock``, which also guards starting and reaping the
        # child), and replies are read in the order the batches were sent
        # (``_turn``). Never take ``_lock`` while holding ``_turn``.
        self._lock = threading.RLock()
        self._turn = threading.Condition()
        self._sent = 0
        self._read = 0
        #: Counts children reaped: a reply owed by a dead child never comes.
        self._generation = 0
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None

    def start(self) -> None:
        """Start the child now rather than at the first write (blocks).

        Starting it takes most of a second (a new interpreter importing the
        storage code): better before events arrive than in their way.
        """
        with self._lock:
            self._connection()

    def write(self, engine: Engine, sql: Statements, batch: Batch) -> Outcome:
        """Write a batch: events in the child, then the rest with ``engine``.

        Blocks; call it from a worker thread, as :func:`write_batch`.

        Raises:
            WriterProcessError: the child could not write the events; none
                of the batch is to be taken as written.
            Exception: as :func:`write_batch`, for the alerts and dead
                letters, when nothing of the batch was written.
        """
        out = Outcome()
        if batch.events:
            out = self._write_events(batch.events)
            if out.interrupted is not None or not (batch.alerts or batch.dead_letters):
                return out
        rest = Batch(alerts=batch.alerts, dead_letters=batch.dead_letters)
        try:
            tail = write_batch(engine, sql, rest)
        except Exception as exc:
            if not batch.events or not is_transient(exc):
                raise
            # The events are in; only the rest is to be tried again.
            out.interrupted = exc
            return out
        return _merged(out, tail)

    def _write_events(self, events: EventItems) -> Outcome:
        reply = self._ask(_encode(events))
        if reply.failed is not None:
            raise WriterProcessError(reply.failed)
        out = Outcome(
            events_written=reply.written,
            events_duplicate=reply.duplicate,
            batch_error=reply.batch_error,
            done=Batch(events=events[: reply.done]),
            rejected=[("events", events[i], why) for i, why in reply.rejected],
        )
        if reply.interrupted is not None:
            out.interrupted = WriterProcessError(reply.interrupted)
        return out

    def _ask(self, message: bytes) -> _Reply:
        with self._lock:
            conn = self._connection()
            generation, ticket = self._generation, self._sent
            self._sent += 1
            try:
                conn.send_bytes(message)
            except (EOFError, OSError) as exc:
                raise self._died(exc, generation) from exc
        with self._turn:
            self._turn.wait_for(
                lambda: self._read == ticket or self._generation != generation
            )
            if self._generation != generation:
                msg = "the writer process died before it answered for this batch"
                raise WriterProcessError(msg)
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError) as exc:
            raise self._died(exc, generation) from exc
        finally:
            with self._turn:
                if self._generation == generation:
                    self._read += 1
                self._turn.notify_all()
        return _decode_reply(data)

    def _died(self, exc: BaseException, generation: int) -> WriterProcessError:
        code = None
        with self._lock:
            if self._generation == generation:
                code = self._reap()
        msg = f"the writer process died (exit code {code}): {exc or 'EOF'}"
        return WriterProcessError(msg)

    def _connection(self) -> Connection:
        if self._conn is not None and self._process is not None:
            if self._process.is_alive():
                return self._conn
            code = self._reap()
            logger.warning("The writer process died (exit code %s).", code)
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(
            target=serve,
            args=(child, self.url, self.busy_timeout),
            name="immune-storage-writer",
            daemon=True,
        )
        process.start()
        child.close()
        self._process, self._conn = process, parent
        if self._started:
            self.metrics.inc("storage.writer_restarts")
        self._started += 1
        logger.debug("Writer process %s started.", process.pid)
        return parent

    def _reap(self) -> int | None:
        # Called with _lock held.
        process, conn = self._process, self._conn
        self._process = self._conn = None
        with self._turn:
            self._generation += 1
            self._sent = self._read = 0
            self._turn.notify_all()
        if conn is not None:
            conn.close()
        if process is None:
            return None
        process.join(STOP_TIMEOUT)
        if process.is_alive():
            process.kill()
            process.join()
        return process.exitcode

    def close(self) -> None:
        """Stop the child: it leaves when its pipe closes."""
        with self._lock:
            self._reap()


def _merged(out: Outcome, tail: Outcome) -> Outcome:
    out.alerts_written = tail.alerts_written
    out.dead_letters_written = tail.dead_letters_written
    out.rejected.extend(tail.rejected)
    out.batch_error = out.batch_error or tail.batch_error
    out.interrupted = tail.interrupted
    out.done.alerts = tail.done.alerts
    out.done.dead_letters = tail.done.dead_letters
    return out


# -- the child ----------------------------------------------------------------


def serve(conn: Connection, url: URL, busy_timeout: float) -> None:
    """The child's loop: one batch of events in, one reply out, until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    engine = make_engine(url, writer=True, busy_timeout=busy_timeout)
    sql = Statements.for_dialect(engine.dialect.name)
    checkpoints = _Checkpointer.start(engine, url, busy_timeout)
    try:
        while True:
            try:
                message = conn.recv_bytes()
            except EOFError:
                return
            conn.send_bytes(_encode(_write_in_child(engine, sql, message)))
    finally:
        if checkpoints is not None:
            checkpoints.stop()
        engine.dispose()


class _Checkpointer:
    """Moves a SQLite WAL back into the database beside the writer.

    Left to SQLite, the commit that finds the WAL over 1,000 pages copies it
    back and syncs both files itself, and the next batch waits for it: about
    a fifth of the writer's time at full rate. Here a thread of the child
    does it every ``EVERY`` seconds with a connection of its own (PASSIVE:
    it never blocks the writer), while the writer goes on inserting;
    SQLite's own checkpoint stays as a backstop for a WAL over
    ``BACKSTOP_PAGES``.
    """

    EVERY = 0.2
    BACKSTOP_PAGES = 16_000

    def __init__(self, path: str, busy_timeout: float) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="immune-wal-checkpoint", daemon=True
        )

    @classmethod
    def start(
        cls, engine: Engine, url: URL, busy_timeout: float
    ) -> _Checkpointer | None:
        path = url.database
        if engine.dialect.name != "sqlite" or not path or path == ":memory:":
            return None

        @sa_event.listens_for(engine, "connect")
        def _backstop(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.execute(f"PRAGMA wal_autocheckpoint = {cls.BACKSTOP_PAGES}")

        checkpointer = cls(path, busy_timeout)
        checkpointer._thread.start()
        return checkpointer

    def _run(self) -> None:
        db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        try:
            while not self._stop.wait(self.EVERY):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    # The writer's own checkpoint (the backstop) still works.
                    logger.warning("WAL checkpoint failed: %s.", exc)
        finally:
            db.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(STOP_TIMEOUT)


def _write_in_child(engine: Engine, sql: Statements, message: bytes) -> _Reply:
    try:
        events = _decode_events(message)
        out = write_batch(engine, sql, Batch(events=events))
    except Exception as exc:  # noqa: BLE001 - the parent decides what to do
        return _Reply(failed=db_reason(exc))
    rejected = []
    if out.rejected:  # rare: a map of the batch only then
        position = {id(item): i for i, item in enumerate(events)}
        rejected = [(position[id(item)], why) for _table, item, why in out.rejected]
    interrupted: Any = out.interrupted
    return _Reply(
        written=out.events_written,
        duplicate=out.events_duplicate,
        done=len(out.done.events),
        rejected=rejected,
        batch_error=out.batch_error,
        interrupted=None if interrupted is None else db_reason(interrupted),
    )
