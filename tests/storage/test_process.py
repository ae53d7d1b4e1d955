"""The writer process: events written by a child, and what happens when it dies."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from immune.config import StorageConfig
from immune.events import to_dict
from immune.storage import Store

from .conftest import make_alert, make_event, wait_until


def _child_pid(store: Store) -> int:
    process = store._process._process  # type: ignore[union-attr]
    assert process is not None and process.pid is not None
    return process.pid


@pytest.mark.parametrize("writer", ["process", "thread"])
async def test_store_writer_modes_store_the_same_rows(db_url: str, writer: str) -> None:
    config = StorageConfig(batch_size=50, flush_interval=0.01, writer=writer)
    store = Store(db_url, config=config)
    try:
        store.upgrade()
        events = [make_event() for _ in range(120)]
        alert = make_alert(event_ids=[events[0].id])
        await store.add_events(events + events[:10])
        await store.add_alert(alert)
        await store.flush()

        assert (store._process is None) == (writer == "thread")
        stored = sorted(store.events(limit=500), key=lambda e: e["id"])
        assert stored == sorted((to_dict(e) for e in events), key=lambda e: e["id"])
        assert store.metrics.get("storage.events_written") == 120
        assert store.metrics.get("storage.events_duplicate") == 10
        assert [a["id"] for a in store.alerts()] == [alert.id]
    finally:
        await store.stop()
        store.close()


async def test_store_writer_process_killed_loses_nothing(sqlite_url: str) -> None:
    store = Store(sqlite_url, config=StorageConfig(batch_size=100, flush_interval=0.01))
    try:
        store.upgrade()
        await store.start()
        first = [make_event() for _ in range(100)]
        await store.add_events(first)
        await wait_until(lambda: store.metrics.get("storage.events_written") == 100)

        killed = _child_pid(store)
        os.kill(killed, signal.SIGKILL)
        second = [make_event() for _ in range(300)]
        await store.add_events(second)
        await wait_until(lambda: store.metrics.get("storage.events_written") == 400)

        # Whether the next write found the child dead or died with it, a new
        # child wrote the rest, and nothing was lost or stored twice.
        assert store.counts()["events"] == 400
        assert _child_pid(store) != killed
        assert store.metrics.get("storage.writer_restarts") == 1
        assert store.pending == 0
    finally:
        await store.stop()
        store.close()


async def test_store_writer_process_ignores_ctrl_c_and_stops_with_the_store(
    sqlite_url: str,
) -> None:
    store = Store(sqlite_url, config=StorageConfig(batch_size=10, flush_interval=0.01))
    store.upgrade()
    await store.add_events([make_event() for _ in range(10)])
    await store.flush()
    pid = _child_pid(store)

    # Ctrl-C reaches the whole process group; the hive decides when to stop.
    os.kill(pid, signal.SIGINT)
    await asyncio.sleep(0.2)
    await store.add_events([make_event() for _ in range(10)])
    await store.flush()
    assert _child_pid(store) == pid
    assert store.counts()["events"] == 20

    await store.stop()
    store.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_store_run_from_standard_input_writes_from_a_thread(tmp_path) -> None:
    # A spawned child would import the main script again; `python -` has none.
    program = f"""
import asyncio
from immune.events import Event
from immune.storage import Store

async def main():
    store = Store("sqlite:///{tmp_path}/stdin.db")
    store.upgrade()
    await store.add_event(Event(id="e-1", agent_id="a", host="h", ts=1, kind="exec"))
    await store.flush()
    print(store.counts()["events"], store._process is None)
    await store.stop()
    store.close()

asyncio.run(main())
"""
    result = subprocess.run(
        [sys.executable, "-"], input=program, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "True"]
    assert "No writer process" in result.stderr


async def test_store_writer_process_starts_with_the_store(sqlite_url: str) -> None:
    # Started by start(), not by the first batch: the first events do not
    # wait for a new interpreter to import the storage code.
    store = Store(sqlite_url, config=StorageConfig(batch_size=10, flush_interval=0.01))
    store.upgrade()
    await store.start()
    try:
        pid = _child_pid(store)
        os.kill(pid, 0)  # alive before anything was written
        await store.add_events([make_event() for _ in range(10)])
        await store.flush()
        assert _child_pid(store) == pid
        assert store.metrics.get("storage.writer_restarts") == 0
    finally:
        await store.stop()
        store.close()


async def test_store_two_batches_in_flight_each_get_their_own_answer(
    sqlite_url: str,
) -> None:
    # flush() hands the child a second batch while it writes the first; the
    # answers are read in order, so each batch is counted as what it was.
    config = StorageConfig(batch_size=100, flush_interval=60)
    store = Store(sqlite_url, config=config)
    store.upgrade()
    try:
        fresh = [make_event() for _ in range(100)]
        await store.add_events(fresh)
        await store.flush()
        again = fresh[:40] + [make_event() for _ in range(60)]
        more = [make_event() for _ in range(100)]
        await store.add_events(again + more)
        assert store.pending == 200
        await store.flush()
        assert store.metrics.get("storage.flushes") == 3
        assert store.metrics.get("storage.events_written") == 260
        assert store.metrics.get("storage.events_duplicate") == 40
        assert store.counts()["events"] == 260
        assert store.pending == 0
    finally:
        await store.stop()
        store.close()


async def test_store_writer_process_checkpoints_the_wal_beside_the_writer(
    tmp_path,
) -> None:
    # The child's own thread copies the WAL back into the database: the
    # database file grows with the rows although the WAL is far below the
    # 1,000 pages at which SQLite's commit would have done it itself.
    path = tmp_path / "wal.db"
    store = Store(f"sqlite:///{path}", config=StorageConfig(batch_size=500))
    store.upgrade()
    await store.start()
    try:
        before = path.stat().st_size
        await store.add_events([make_event() for _ in range(1000)])
        await store.flush()
        wal = path.with_name("wal.db-wal").stat().st_size
        assert wal < 1000 * 4096
        await wait_until(lambda: path.stat().st_size > before + 100_000)
        assert store.counts()["events"] == 1000
    finally:
        await store.stop()
        store.close()
