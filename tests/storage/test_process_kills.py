"""Two batches in flight to the writer process lose and double nothing."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import threading

import pytest
import sqlalchemy as sa

from immune.config import StorageConfig
from immune.storage import Store

from .conftest import make_event


def _child_pid(store: Store) -> int | None:
    process = store._process._process  # type: ignore[union-attr]
    return None if process is None else process.pid


def _stored_ids(store: Store) -> list[str]:
    with store._reader.connect() as conn:
        return [row[0] for row in conn.execute(sa.text("SELECT id FROM events"))]


async def _killer(store: Store, rng: random.Random, stop: asyncio.Event) -> int:
    kills = 0
    while not stop.is_set():
        await asyncio.sleep(rng.uniform(0.0, 0.08))
        pid = _child_pid(store)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
    return kills


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_children_killed_at_random_lose_and_double_nothing(
    db_url: str, seed: int
) -> None:
    rng = random.Random(seed)
    config = StorageConfig(batch_size=rng.choice([50, 200, 700]), flush_interval=0.005)
    store = Store(db_url, config=config)
    store.upgrade()
    await store.start()
    try:
        events = [make_event() for _ in range(6000)]
        stop = asyncio.Event()
        killer = asyncio.ensure_future(_killer(store, rng, stop))
        for start in range(0, len(events), 500):
            await store.add_events(events[start : start + 500])
            await asyncio.sleep(rng.uniform(0, 0.02))
        await asyncio.sleep(0.3)
        stop.set()
        kills = await asyncio.wait_for(killer, 10)
        await asyncio.wait_for(store.flush(), 60)
        ids = _stored_ids(store)
        assert len(ids) == len(set(ids)) == len(events)
        assert set(ids) == {e.id for e in events}
        assert store.pending == 0
        assert kills >= 1
        assert store.metrics.get("storage.writer_restarts") >= 1
    finally:
        await asyncio.wait_for(store.stop(), 60)
        store.close()


async def test_stop_with_two_batches_in_flight_writes_everything(
    db_url: str,
) -> None:
    config = StorageConfig(batch_size=300, flush_interval=0.001)
    store = Store(db_url, config=config)
    store.upgrade()
    await store.start()
    events = [make_event() for _ in range(5000)]
    try:
        await store.add_events(events)
        await asyncio.sleep(0.01)  # the background flush has batches out
        await asyncio.wait_for(store.stop(), 60)
        assert store.pending == 0
        ids = _stored_ids(store)
        assert sorted(ids) == sorted(e.id for e in events)
    finally:
        store.close()


async def test_cancelled_flush_settles_both_batches(db_url: str) -> None:
    # flush() cancelled while two batches are out: the orphaned writes settle.
    config = StorageConfig(batch_size=400, flush_interval=60)
    store = Store(db_url, config=config)
    store.upgrade()
    await store.start()
    events = [make_event() for _ in range(4000)]
    try:
        for delay in (0.0, 0.001, 0.005, 0.02):
            await store.add_events(events[:1000])
            events_left = events[1000:]
            flushing = asyncio.ensure_future(store.flush())
            await asyncio.sleep(delay)
            flushing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await flushing
            events = events_left
        await asyncio.wait_for(store.flush(), 60)
        assert store.pending == 0
        assert len(_stored_ids(store)) == 4000
        assert len(set(_stored_ids(store))) == 4000
    finally:
        await asyncio.wait_for(store.stop(), 60)
        store.close()


async def test_sqlite_locked_by_another_connection(sqlite_url: str) -> None:
    config = StorageConfig(batch_size=250, flush_interval=0.005)
    store = Store(sqlite_url, config=config)
    store.upgrade()
    path = sa.engine.make_url(sqlite_url).database
    await store.start()
    try:
        events = [make_event() for _ in range(5000)]
        await store.add_events(events[:1000])
        locker = sqlite3.connect(path, timeout=30, check_same_thread=False)
        locked = threading.Event()

        def hold() -> None:
            locker.execute("BEGIN EXCLUSIVE")
            locked.set()

        await asyncio.to_thread(hold)
        await store.add_events(events[1000:])  # in flight while locked
        await asyncio.sleep(3.0)
        await asyncio.to_thread(locker.rollback)
        locker.close()
        await asyncio.wait_for(store.flush(), 120)
        ids = _stored_ids(store)
        assert len(ids) == len(set(ids)) == 5000
        assert store.pending == 0
    finally:
        await asyncio.wait_for(store.stop(), 60)
        store.close()
