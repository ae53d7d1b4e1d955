"""The hive's write path and read API.

Events, alerts and dead letters are buffered and written in batches, one
transaction per batch, from a worker thread, so the event loop never waits on
the database; by default the events' rows are built and inserted by a child
process (:mod:`immune.storage.process`), on another core. A batch is written
when ``batch_size`` rows are pending or every ``flush_interval`` seconds.
Nothing is dropped: when the database is locked or gone, the rows stay
pending and the write is retried with exponential backoff; when
``max_pending`` rows are pending, writers wait. A row the database refuses by
itself becomes a dead letter with the database's reason.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from itertools import islice
from types import TracebackType
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import URL

from immune.config import StorageConfig
from immune.errors import StorageError
from immune.events import Alert, Event, new_id
from immune.metrics import Metrics
from immune.storage import migrate, queries, responses
from immune.storage.engine import (
    DEFAULT_BUSY_TIMEOUT,
    is_transient,
    make_engine,
    normalize_url,
)
from immune.storage.process import WriterProcess, can_spawn
from immune.storage.writer import (
    Batch,
    Outcome,
    Row,
    Statements,
    db_reason,
    dead_letter_row,
    payload_of,
    write_batch,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: First and longest wait between two tries of a failed write, in seconds.
BACKOFF_START = 0.05
BACKOFF_MAX = 5.0


class Store:
    """The database of the hive.

    Args:
        url: ``sqlite:///path`` or ``postgresql://...`` (psycopg 3).
        config: batch size, flush interval and the most rows held pending.
        metrics: where the ``storage.*`` counters are kept.
        busy_timeout: seconds a SQLite connection waits for a lock before a
            write fails (and is retried).
    """

    def __init__(
        self,
        url: str | URL,
        *,
        config: StorageConfig | None = None,
        metrics: Metrics | None = None,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    ) -> None:
        self.url = normalize_url(url)
        self.config = config or StorageConfig()
        self.metrics = metrics or Metrics()
        self._writer = make_engine(self.url, writer=True, busy_timeout=busy_timeout)
        self._reader = make_engine(self.url, writer=False, busy_timeout=busy_timeout)
        self._sql = Statements.for_dialect(self._writer.dialect.name)
        self._process = (
            WriterProcess(self.url, busy_timeout=busy_timeout, metrics=self.metrics)
            if self.config.writer == "process" and can_spawn()
            else None
        )
        self._events: list[tuple[int, Event]] = []
        self._alerts: dict[str, Alert] = {}
        self._dead: list[Row] = []
        self._in_flight = 0
        self._flush_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # Writes whose waiter was cancelled; their thread still runs.
        self._orphans: set[asyncio.Future[Any]] = set()

    def __repr__(self) -> str:
        return f"Store({self.url.render_as_string(hide_password=True)!r})"

    @property
    def pending(self) -> int:
        """Rows accepted but not yet written (including those being written)."""
        return self._queued_rows() + self._in_flight

    # Lifecycle

    def upgrade(self) -> None:
        """Bring the database schema to the latest migration.

        Raises:
            StorageError: the database cannot be reached or refused a step.
        """
        try:
            migrate.upgrade(self.url)
        except sa.exc.SQLAlchemyError as exc:
            msg = f"cannot upgrade the database of {self!r}: {db_reason(exc)}"
            raise StorageError(msg) from exc

    async def start(self) -> None:
        """Start writing batches in the background.

        Raises:
            StorageError: see :meth:`check_ready`.
        """
        if self._task is not None:
            return
        await asyncio.to_thread(self.check_ready)
        if self._process is not None:
            await asyncio.to_thread(self._process.start)
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="immune.storage.flush")
        logger.info("Storage started on %r.", self)

    async def stop(self, timeout: float | None = None) -> None:
        """Write every pending row, then stop the background writer.

        Args:
            timeout: seconds to wait for the database; None waits as long as
                it takes, since rows are never dropped.

        Raises:
            StorageError: the timeout expired; the rows are still pending.
        """
        try:
            await asyncio.wait_for(self._stop(), timeout)
        except TimeoutError:
            msg = f"{self.pending} rows could not be written within {timeout} s"
            raise StorageError(msg) from None
        logger.info("Storage stopped; every pending row was written.")

    async def _stop(self) -> None:
        task, self._task = self._task, None
        # A writer cancelled from outside (the loop shutting down) is done.
        if task is not None and not task.done():
            self._stopping = True
            self._wake.set()
            await task
        await self.flush()
        if self._process is not None:
            await asyncio.to_thread(self._process.close)

    def close(self) -> None:
        """Close the database connections (after :meth:`stop`)."""
        if self.pending:
            logger.warning("Closing storage with %d rows unwritten.", self.pending)
        if self._process is not None:
            self._process.close()
        self._writer.dispose()
        self._reader.dispose()

    async def __aenter__(self) -> Store:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.stop()
        finally:
            self.close()

    def check_ready(self) -> None:
        """Make sure the database can be reached and its schema is current.

        Raises:
            StorageError: it cannot be reached, or it is not migrated to the
                schema this version of IMMUNE uses.
        """
        try:
            with self._reader.connect() as conn:
                current = migrate.current_revisions(conn)
        except sa.exc.SQLAlchemyError as exc:
            msg = f"cannot reach the database of {self!r}: {db_reason(exc)}"
            raise StorageError(msg) from exc
        heads = migrate.head_revisions()
        if current != heads:
            at = ", ".join(sorted(current)) or "no schema"
            msg = (
                f"the database of {self!r} is at {at}, not at "
                f"{', '.join(sorted(heads))}: run `immune db upgrade`"
            )
            raise StorageError(msg)

    # Buffered writes

    async def add_event(self, event: Event) -> None:
        """Queue an event; an id already stored is stored once."""
        if self.pending >= self.config.max_pending:
            await self._wait_for_room()
        self._events.append((time.time_ns(), event))
        self._queued()

    def offer_event(self, event: Event) -> Awaitable[None] | None:
        """Queue an event at once if there is room, as :meth:`add_event` does.

        Returns None when the event was queued, else the awaitable of
        :meth:`add_event`, which waits for room. The hive subscribes this to
        every event: the usual case then costs no coroutine.
        """
        if self.pending >= self.config.max_pending:
            return self.add_event(event)
        self._events.append((time.time_ns(), event))
        self._queued()
        return None

    async def add_events(self, events: Sequence[Event]) -> None:
        """Queue events (see :meth:`add_event`), waiting for room as needed."""
        now = time.time_ns()
        start = 0
        while start < len(events):
            if self.pending >= self.config.max_pending:
                await self._wait_for_room()
            end = start + self.config.max_pending - self.pending
            self._events.extend([(now, event) for event in events[start:end]])
            start = end
            self._queued()

    async def add_alert(self, alert: Alert) -> None:
        """Queue an alert; one stored again with the same id updates the row.

        The update replaces count, data, title, severity, agent_id, host,
        event_ids, techniques and description; ts, rule and plugin stay. A
        copy whose count is lower than the one held is older and ignored.
        """
        queued = self._alerts.get(alert.id)
        if queued is None and self.pending >= self.config.max_pending:
            await self._wait_for_room()
        # A copy counting less is older (see immune.dedup): keep the newer.
        if queued is None or alert.count >= queued.count:
            self._alerts[alert.id] = alert
        self._queued()

    async def add_dead_letter(
        self, source: str, reason: str, payload: bytes | None, raw: object = None
    ) -> None:
        """Queue a message that could not be used.

        Args:
            source: where it came from: the MQTT topic, ``plugin:<name>``...
            reason: why it was refused, for a person.
            payload: the bytes as received; kept up to 64 KiB, with the size
                and the SHA-256 of the whole.
            raw: when there are no bytes, the decoded object, kept as JSON.
        """
        if payload is None:
            payload = b"" if raw is None else payload_of(raw)
        row = dead_letter_row(time.time_ns(), source, reason, payload)
        if self.pending >= self.config.max_pending:
            await self._wait_for_room()
        self._dead.append(row)
        self._queued()

    def _queued(self) -> None:
        pending = self.pending
        self.metrics.set("storage.pending", pending)
        if pending >= self.config.batch_size:
            self._wake.set()

    async def _wait_for_room(self) -> None:
        while self.pending >= self.config.max_pending:
            self._room.clear()
            if self._task is None or self._task.done():
                # No background writer: make the room ourselves.
                await self.flush()
            else:
                self._wake.set()
                await self._room.wait()

    # Flushing

    async def flush(self) -> None:
        """Write the rows pending now, retrying until the database takes them.

        Rows the database refuses are in ``dead_letters`` when it returns.
        """
        async with self._flush_lock:
            if self._orphans:
                await asyncio.wait(set(self._orphans))
            rounds = self.pending // self.config.batch_size + 1
            delay = BACKOFF_START
            # The writer process takes a second batch while it writes the
            # first: it never waits for the event loop to hand it the next.
            depth = 1 if self._process is None else 2
            running: set[asyncio.Task[tuple[BaseException | None, int]]] = set()
            try:
                while True:
                    while rounds and self._queued_rows() and len(running) < depth:
                        batch = self._take()
                        running.add(asyncio.ensure_future(self._write_once(batch)))
                        rounds -= 1
                    if not running:
                        return
                    done, running = await asyncio.wait(
                        running, return_when=asyncio.FIRST_COMPLETED
                    )
                    errors = []
                    for task in done:
                        error, rejected = task.result()
                        if error is not None:
                            errors.append(error)
                            rounds += 1  # its rows are back in the queue
                        elif rejected:
                            # Refused rows came back as dead letters.
                            rounds += 1
                    if not errors:
                        delay = BACKOFF_START
                        continue
                    logger.warning(
                        "Writing to the database failed, %d rows kept, retrying "
                        "in %.2f s: %s.",
                        self.pending,
                        delay,
                        db_reason(errors[0]),
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, BACKOFF_MAX)
            except asyncio.CancelledError:
                # Writes under way settle their batch when they end.
                for task in running:
                    self._orphans.add(task)
                    task.add_done_callback(self._orphans.discard)
                raise

    async def _run(self) -> None:
        interval = self.config.flush_interval
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
            except TimeoutError:
                pass
            self._wake.clear()
            if not self.pending:
                continue
            try:
                await self.flush()
            except Exception:
                # A bug, not the database (flush retries those): keep going,
                # or writers waiting for room would wait forever.
                logger.exception("Flushing pending rows failed.")
                await asyncio.sleep(BACKOFF_MAX)

    def _queued_rows(self) -> int:
        """Rows waiting to be taken (``pending`` less those being written)."""
        return len(self._events) + len(self._alerts) + len(self._dead)

    def _take(self) -> Batch:
        size = self.config.batch_size
        batch = Batch(
            events=self._events[:size],
            alerts=[self._alerts.pop(i) for i in list(islice(self._alerts, size))],
            dead_letters=self._dead[:size],
        )
        del self._events[:size]
        del self._dead[:size]
        self._in_flight += len(batch)
        return batch

    async def _write_once(self, batch: Batch) -> tuple[BaseException | None, int]:
        write = write_batch if self._process is None else self._process.write
        future = asyncio.ensure_future(
            asyncio.to_thread(write, self._writer, self._sql, batch)
        )
        try:
            await asyncio.wait((future,))
        except asyncio.CancelledError:
            # The thread cannot be stopped: settle the batch when it is done,
            # so its rows are neither lost nor written twice.
            future.add_done_callback(functools.partial(self._settle, batch))
            future.add_done_callback(self._orphans.discard)
            self._orphans.add(future)
            raise
        return self._settle(batch, future)

    def _settle(
        self, batch: Batch, future: asyncio.Future[Outcome]
    ) -> tuple[BaseException | None, int]:
        """Account for a finished write; put back what was not written.

        Returns:
            the error that stopped the write, if any, and how many rows the
            database refused.
        """
        self._in_flight -= len(batch)
        error = future.exception()
        if error is not None:
            self.metrics.inc("storage.flush_errors")
            self._put_back(batch, Batch())
            return error, 0
        outcome = future.result()
        self._count(outcome)
        self._dead_letter_rejected(outcome)
        if outcome.interrupted is not None:
            self.metrics.inc("storage.flush_errors")
            self._put_back(batch, outcome.done)
        if self.pending < self.config.max_pending:
            self._room.set()
        self.metrics.set("storage.pending", self.pending)
        return outcome.interrupted, len(outcome.rejected)

    def _put_back(self, batch: Batch, done: Batch) -> None:
        # Rows are written in order, events first: what is done is a prefix.
        self._events[:0] = batch.events[len(done.events) :]
        for alert in batch.alerts[len(done.alerts) :]:
            # An alert queued again meanwhile is newer: keep it.
            self._alerts.setdefault(alert.id, alert)
        self._dead[:0] = batch.dead_letters[len(done.dead_letters) :]

    def _count(self, outcome: Outcome) -> None:
        inc = self.metrics.inc
        inc("storage.flushes")
        inc("storage.events_written", outcome.events_written)
        inc("storage.events_duplicate", outcome.events_duplicate)
        inc("storage.alerts_written", outcome.alerts_written)
        inc("storage.deadletters_written", outcome.dead_letters_written)

    def _dead_letter_rejected(self, outcome: Outcome) -> None:
        now = time.time_ns()
        for table, item, reason in outcome.rejected:
            self.metrics.inc("storage.rejected_rows")
            if table == "dead_letters":
                # Dead letters are cleaned so this cannot happen; if it does,
                # the log is the last place the row is seen.
                logger.error(
                    "The database refused a dead letter (sha256 %s): %s.",
                    item[5],
                    reason,
                )
                continue
            obj = item[1] if table == "events" else item
            logger.warning("The database refused a row of %s: %s.", table, reason)
            why = f"the database refused the row: {reason}"
            self._dead.append(
                dead_letter_row(now, f"storage:{table}", why, payload_of(obj))
            )

    # Writes made at once

    async def _write_now(self, fn: Callable[..., T], *args: Any) -> T:
        delay = BACKOFF_START
        while True:
            try:
                return await asyncio.to_thread(self._transaction, fn, *args)
            except Exception as exc:
                if not is_transient(exc):
                    msg = f"the database refused a write: {db_reason(exc)}"
                    raise StorageError(msg) from exc
                self.metrics.inc("storage.flush_errors")
                logger.warning(
                    "Writing to the database failed, retrying in %.2f s: %s.",
                    delay,
                    db_reason(exc),
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    def _transaction(self, fn: Callable[..., T], *args: Any) -> T:
        with self._writer.begin() as conn:
            return fn(conn, *args)

    async def upsert_agent(self, agent_id: str, **fields: Any) -> None:
        """Record an agent's registration or heartbeat; sets ``last_seen``.

        Args:
            agent_id: the agent's identifier.
            fields: any of hostname, os, version, sensors (a list), status
                (``online`` unless given) and data (a dict); fields not given
                keep their stored value.

        Raises:
            TypeError: an unknown field.
            ValueError: an invalid status.
        """
        unknown = set(fields) - queries.AGENT_FIELDS
        if unknown:
            raise TypeError(f"unknown agent fields: {', '.join(sorted(unknown))}")
        if "status" in fields:
            queries.check_status(fields["status"])
        await self._write_now(queries.upsert_agent, agent_id, fields, time.time_ns())

    async def set_agent_status(self, agent_id: str, status: str) -> bool:
        """Mark an agent online, offline or unknown; False if it is unknown."""
        queries.check_status(status)
        return await self._write_now(queries.set_agent_status, agent_id, status)

    async def add_command(
        self,
        agent_id: str,
        action: str,
        args: dict[str, Any] | None = None,
        *,
        command_id: str | None = None,
        expires_ns: int | None = None,
        origin: str | None = None,
        alert_id: str | None = None,
    ) -> str:
        """Record a command for an agent, in state ``pending``; returns its id.

        Args:
            agent_id: the agent that must act.
            action: what it must do.
            args: the action's arguments (JSON).
            command_id: defaults to a new UUIDv7.
            expires_ns: when it times out, in ns since the epoch.
            origin: the plugin that issued it.
            alert_id: the alert it answers, if any.
        """
        now = time.time_ns()
        values = {
            "id": command_id or new_id(),
            "agent_id": agent_id,
            "action": action,
            "args": args or {},
            "state": "pending",
            "created": now,
            "expires": expires_ns,
            "updated": now,
            "result": None,
            "origin": origin,
            "alert_id": alert_id,
        }
        await self._write_now(queries.add_command, values)
        return str(values["id"])

    async def update_command(
        self, command_id: str, state: str, result: Any = None, error: str | None = None
    ) -> bool:
        """Move a command to ``state``; False if there is no such command.

        Args:
            state: pending, sent, acknowledged, succeeded, failed, timed_out
                or refused.
            result: what the agent answered (JSON); None keeps the stored one.
            error: why it failed or was refused; None keeps the stored one.
        """
        queries.check_state(state)
        values: dict[str, Any] = {"state": state, "updated": time.time_ns()}
        if result is not None:
            values["result"] = result
        if error is not None:
            values["error"] = error
        return await self._write_now(queries.update_command, command_id, values)

    def command(self, command_id: str) -> dict[str, Any] | None:
        """One command by id, or None."""
        return queries.command(self._reader, command_id)

    async def put_state(self, plugin: str, key: str, value: Any) -> None:
        """Keep a JSON value for a plugin across restarts."""
        await self._write_now(queries.put_state, plugin, key, value, time.time_ns())

    async def get_state(self, plugin: str, key: str, default: Any = None) -> Any:
        """A plugin's stored value, or ``default``."""
        found, value = await asyncio.to_thread(
            queries.get_state, self._reader, plugin, key
        )
        return value if found else default

    # Reads (synchronous, on their own connections)

    def events(
        self,
        *,
        kind: str | None = None,
        agent_id: str | None = None,
        since_ns: int | None = None,
        until_ns: int | None = None,
        exe: str | None = None,
        pid: int | None = None,
        limit: int | None = 100,
    ) -> list[dict[str, Any]]:
        """Stored events, newest first, as event dicts.

        Args:
            since_ns: only events at or after this time (ns).
            until_ns: only events before this time (ns).
            exe: only events of this executable (the exact path).
            pid: only events of this process id.
            limit: at most this many; None for all.
        """
        return queries.events(
            self._reader,
            kind=kind,
            agent_id=agent_id,
            since_ns=since_ns,
            until_ns=until_ns,
            exe=exe,
            pid=pid,
            limit=limit,
        )

    def alerts(
        self,
        *,
        min_severity: str | None = None,
        agent_id: str | None = None,
        since_ns: int | None = None,
        limit: int | None = 100,
    ) -> list[dict[str, Any]]:
        """Stored alerts, newest first.

        Args:
            min_severity: only alerts of this severity or worse.
        """
        return queries.alerts(
            self._reader,
            min_severity=min_severity,
            agent_id=agent_id,
            since_ns=since_ns,
            limit=limit,
        )

    def dead_letters(self, *, limit: int | None = 100) -> list[dict[str, Any]]:
        """Dead letters, newest first."""
        return queries.dead_letters(self._reader, limit=limit)

    def agents(self) -> list[dict[str, Any]]:
        """Every known agent."""
        return queries.agents(self._reader)

    def commands(
        self,
        *,
        agent_id: str | None = None,
        state: str | None = None,
        limit: int | None = 100,
    ) -> list[dict[str, Any]]:
        """Commands, newest first."""
        return queries.commands(
            self._reader, agent_id=agent_id, state=state, limit=limit
        )

    def counts(self) -> dict[str, int]:
        """Rows per table."""
        return queries.counts(self._reader)

    # Playbook runs and response commands (immune.storage.responses)

    async def add_run(self, **values: Any) -> None:
        """Record a playbook run (columns of ``playbook_runs``)."""
        await self._write_now(responses.add_run, values)

    async def update_run(self, run_id: str, **values: Any) -> bool:
        """Change a recorded run; False if there is no such run."""
        return await self._write_now(responses.update_run, run_id, values)

    async def add_response_command(self, **values: Any) -> None:
        """Record a command response follows (columns of ``response_commands``)."""
        await self._write_now(responses.add_command, values)

    async def update_response_command(self, command_id: str, **values: Any) -> bool:
        """Change a followed command; False if there is no such command."""
        return await self._write_now(responses.update_command, command_id, values)

    def runs(
        self, *, playbook: str | None = None, limit: int | None = 100
    ) -> list[dict[str, Any]]:
        """Playbook runs, newest first, each with its ``commands``."""
        return responses.runs(self._reader, playbook=playbook, limit=limit)

    def response_commands(
        self,
        *,
        agent_id: str | None = None,
        state: str | None = None,
        limit: int | None = 100,
    ) -> list[dict[str, Any]]:
        """Commands response followed, newest first."""
        return responses.commands(
            self._reader, agent_id=agent_id, state=state, limit=limit
        )
