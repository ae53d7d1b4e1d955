"""Nothing is lost when the database is locked, gone or slow."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy.engine import make_url

from immune.config import StorageConfig
from immune.errors import StorageError
from immune.storage import Store

from .conftest import make_event, wait_until


@pytest.fixture
def locker(sqlite_url: str) -> Iterator[sqlite3.Connection]:
    """Another connection to the SQLite file, in autocommit mode."""
    setup = Store(sqlite_url)
    setup.upgrade()  # also switches the file to WAL
    setup.close()
    conn = sqlite3.connect(make_url(sqlite_url).database, isolation_level=None)
    try:
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()


@pytest.fixture
async def impatient(sqlite_url: str) -> AsyncIterator[Store]:
    """A store that gives up on a lock after 50 ms, and may hold 10 rows."""
    config = StorageConfig(batch_size=5, flush_interval=0.01, max_pending=10)
    store = Store(sqlite_url, config=config, busy_timeout=0.05)
    try:
        yield store
        await store.stop()
    finally:
        store.close()


async def test_store_locked_sqlite_delays_writes_loses_nothing(
    impatient: Store, locker: sqlite3.Connection
) -> None:
    store = impatient
    await store.start()
    locker.execute("BEGIN EXCLUSIVE")

    events = [make_event() for _ in range(8)]
    await store.add_events(events)
    await wait_until(lambda: store.metrics.get("storage.flush_errors") >= 3)
    # WAL: reading goes on while another connection holds the write lock.
    assert store.counts()["events"] == 0
    assert store.pending == 8

    locker.execute("COMMIT")
    await store.stop()

    assert store.pending == 0
    assert {e["id"] for e in store.events(limit=None)} == {e.id for e in events}
    assert store.metrics.get("storage.events_written") == 8


async def test_store_backpressure_waits_for_room(
    impatient: Store, locker: sqlite3.Connection
) -> None:
    store = impatient
    await store.start()
    locker.execute("BEGIN EXCLUSIVE")
    await store.add_events([make_event() for _ in range(10)])  # exactly full

    blocked = asyncio.create_task(store.add_event(make_event()))
    await wait_until(lambda: store.metrics.get("storage.flush_errors") >= 3)
    # Several failed flushes later, the writer still waits for room.
    assert not blocked.done()
    assert store.pending == 10

    locker.execute("COMMIT")
    await asyncio.wait_for(blocked, timeout=30)
    await store.stop()
    assert store.counts()["events"] == 11


async def test_store_add_events_larger_than_max_pending(db_url: str) -> None:
    config = StorageConfig(batch_size=3, flush_interval=0.01, max_pending=7)
    store = Store(db_url, config=config)
    seen: list[float] = []
    set_gauge = store.metrics.set

    def record(name: str, value: float) -> None:
        if name == "storage.pending":
            seen.append(value)
        set_gauge(name, value)

    store.metrics.set = record  # type: ignore[method-assign]  # spy on the gauge
    try:
        store.upgrade()
        await store.start()
        await store.add_events([make_event() for _ in range(40)])
        await store.stop()
        assert store.counts()["events"] == 40
    finally:
        store.close()
    assert max(seen) <= 7
    assert seen[-1] == 0


async def test_store_add_event_without_writer_flushes_to_make_room(
    db_url: str,
) -> None:
    config = StorageConfig(batch_size=100, flush_interval=3600, max_pending=5)
    store = Store(db_url, config=config)
    try:
        store.upgrade()
        for _ in range(12):  # never started: add_event must make room itself
            await store.add_event(make_event())
        assert store.pending <= 5
        assert store.counts()["events"] >= 7
        await store.flush()
        assert store.counts()["events"] == 12
    finally:
        store.close()


async def test_store_stop_timeout_keeps_the_rows(
    impatient: Store, locker: sqlite3.Connection
) -> None:
    store = impatient
    await store.start()
    locker.execute("BEGIN EXCLUSIVE")
    await store.add_events([make_event() for _ in range(4)])

    with pytest.raises(StorageError, match="4 rows could not be written"):
        await store.stop(timeout=0.3)
    assert store.pending == 4

    locker.execute("COMMIT")
    await store.flush()
    assert store.pending == 0
    assert store.counts()["events"] == 4


async def test_store_flush_error_is_logged_with_reason(
    impatient: Store, locker: sqlite3.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    store = impatient
    locker.execute("BEGIN EXCLUSIVE")
    await store.add_event(make_event())
    flushing = asyncio.create_task(store.flush())
    await wait_until(lambda: store.metrics.get("storage.flush_errors") >= 1)
    locker.execute("COMMIT")
    await flushing

    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert any("database is locked" in r.getMessage() for r in warnings)
    assert store.counts()["events"] == 1


@pytest.mark.postgres
async def test_store_survives_lost_postgresql_connections(
    pg_url: str, pg_admin_url: str
) -> None:
    import psycopg

    config = StorageConfig(batch_size=10, flush_interval=0.01)
    store = Store(pg_url, config=config)
    try:
        store.upgrade()
        await store.start()
        await store.add_events([make_event() for _ in range(5)])
        await wait_until(lambda: store.metrics.get("storage.events_written") == 5)

        # Kill every connection to the test database, the store's included.
        name = make_url(pg_url).database
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            ).fetchone()
        assert killed is not None and killed[0] >= 1

        await store.add_events([make_event() for _ in range(5)])
        await store.stop()
        assert store.counts()["events"] == 10
    finally:
        store.close()


async def test_store_cancelled_flush_neither_loses_nor_repeats_rows(
    sqlite_url: str, locker: sqlite3.Connection
) -> None:
    store = Store(sqlite_url, busy_timeout=5.0)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        for n in range(3):  # dead letters: a row written twice would show
            await store.add_dead_letter("t", f"r{n}", b"x")
        flushing = asyncio.create_task(store.flush())
        await wait_until(lambda: store._in_flight == 3)  # the thread waits

        flushing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flushing
        locker.execute("COMMIT")  # the orphaned thread goes on and writes
        await store.flush()

        assert store.pending == 0
        assert sorted(d["reason"] for d in store.dead_letters()) == ["r0", "r1", "r2"]
        assert store.metrics.get("storage.deadletters_written") == 3
    finally:
        store.close()


async def test_store_writer_cancelled_from_outside_still_makes_room(
    db_url: str,
) -> None:
    config = StorageConfig(batch_size=100, flush_interval=3600, max_pending=5)
    store = Store(db_url, config=config)
    try:
        store.upgrade()
        await store.start()
        writer = store._task
        assert writer is not None
        writer.cancel()  # as a loop shutting down would
        await wait_until(writer.done)

        async def add_all() -> None:
            for _ in range(12):
                await store.add_event(make_event())

        await asyncio.wait_for(add_all(), timeout=30)
        await store.stop()
        assert store.counts()["events"] == 12
    finally:
        store.close()
