"""Fixtures and helpers of the storage tests."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from immune.config import StorageConfig
from immune.events import Alert, Event
from immune.storage import Store

_serial = itertools.count()
T0 = 1_700_000_000_000_000_000


def make_event(**fields: Any) -> Event:
    """An exec event with a fresh id; ``fields`` override the defaults."""
    n = next(_serial)
    values: dict[str, Any] = {
        "id": f"ev-{n:06d}",
        "agent_id": "agent-1",
        "host": "host-1",
        "ts": T0 + n,
        "kind": "exec",
        "pid": 1000 + n,
        "exe": "/usr/bin/true",
        "argv": ["true"],
    }
    values.update(fields)
    return Event(**values)


def make_alert(**fields: Any) -> Alert:
    n = next(_serial)
    values: dict[str, Any] = {
        "id": f"al-{n:06d}",
        "ts": T0 + n,
        "rule": "test.rule",
        "title": "Something happened",
        "severity": "high",
        "plugin": "test",
    }
    values.update(fields)
    return Alert(**values)


async def wait_until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    """Wait for a condition to hold; fail if it does not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    """A migrated store, not started, that flushes batches of 50 rows."""
    config = StorageConfig(batch_size=50, flush_interval=0.01, max_pending=1000)
    store = Store(db_url, config=config)
    try:
        await asyncio.to_thread(store.upgrade)
        yield store
        await store.stop()
    finally:
        store.close()
