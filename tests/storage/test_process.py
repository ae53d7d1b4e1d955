"""The writer process: events written by a child, and what happens when it dies."""

from __future__ import annotations

import asyncio
import os
import signal

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

        os.kill(_child_pid(store), signal.SIGKILL)
        second = [make_event() for _ in range(300)]
        await store.add_events(second)
        await wait_until(lambda: store.metrics.get("storage.events_written") == 400)

        assert store.counts()["events"] == 400
        assert store.metrics.get("storage.flush_errors") >= 1
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
