"""Delivery: the spool, receipts, and the acceptance tests of issue #3.

A broker restarted in the middle of 100,000 events, and a hive stopped for
30 s while the agent keeps producing: every event stored exactly once, in
the order it was produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from pathlib import Path

import orjson
import pytest

from immune.agent import Agent
from immune.agent.spool import Spool
from immune.events import Event, new_id, now_ns

from .conftest import agent_config, hive_config, until

#: How long the hive is away (the issue's acceptance test: 30 s).
OUTAGE = float(os.environ.get("IMMUNE_TEST_OUTAGE", "30"))


def marker(agent: Agent, n: int) -> Event:
    return Event(
        id=new_id(),
        agent_id=agent.agent_id,
        host=agent.host,
        ts=now_ns(),
        kind="exec",
        pid=1,
        sensor="test",
        extra={"marker": n},
    )


def arrivals(path: Path) -> list[tuple[int, int]]:
    """(marker, received_at) of every stored marker event, by marker."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute(
            "SELECT json_extract(data, '$.extra.marker'), received_at FROM events "
            "WHERE json_extract(data, '$.extra.marker') IS NOT NULL ORDER BY 1"
        ).fetchall()
    return [(int(m), int(r)) for m, r in rows]


# --- The spool alone ---------------------------------------------------------


def test_spool_keeps_order_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s" / "agent.spool"
    spool = Spool(path, 100)
    spool.append([b"a", b"b", b"c"])
    spool.close()
    spool = Spool(path, 100)
    assert [e for _, e in spool.read(0, max_events=10, max_bytes=1000)] == [
        b"a",
        b"b",
        b"c",
    ]
    assert path.stat().st_mode & 0o777 == 0o600


def test_spool_full_drops_the_oldest_and_remembers_how_many(tmp_path: Path) -> None:
    path = tmp_path / "agent.spool"
    spool = Spool(path, 3)
    assert spool.append([b"1", b"2"]) == 0
    assert spool.append([b"3", b"4", b"5"]) == 2
    assert [e for _, e in spool.read(0, max_events=10, max_bytes=100)] == [
        b"3",
        b"4",
        b"5",
    ]
    spool.close()
    assert Spool(path, 3).dropped == 2


def test_spool_numbers_never_reused_after_emptying(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "agent.spool", 10)
    spool.append([b"a", b"b"])
    rows = spool.read(0, max_events=10, max_bytes=100)
    assert spool.remove(rows[0][0], rows[-1][0]) == 2 and len(spool) == 0
    spool.append([b"c"])
    ((seq, _),) = spool.read(0, max_events=10, max_bytes=100)
    assert seq == 3  # a receipt for the old batch can never delete it


def test_spool_read_respects_byte_budget_but_returns_one(tmp_path: Path) -> None:
    spool = Spool(":memory:", 10)
    spool.append([b"x" * 50, b"y" * 50, b"z" * 50])
    assert len(spool.read(0, max_events=10, max_bytes=120)) == 2
    assert len(spool.read(0, max_events=10, max_bytes=10)) == 1


def test_spool_unwritable_names_the_setting(tmp_path: Path) -> None:
    from immune.agent.spool import SpoolError

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SpoolError, match=r"set \[agent\] spool"):
        Spool(blocker / "agent.spool", 10)


def test_spool_overflow_reported_in_heartbeat(tmp_path: Path) -> None:
    config = agent_config(tmp_path, "mqtt://127.0.0.1:1", "p", spool_max_events=5)
    agent = Agent(config)
    agent.spool = agent._open_spool()
    agent._append([b"{}"] * 8)
    beat = agent.heartbeat()
    assert beat["spool"] == {"depth": 5, "dropped": 3}
    assert beat["counters"]["agent.spool_dropped"] == 3


# --- With a hive, over a real broker -----------------------------------------


@pytest.mark.mqtt
async def test_delivery_receipts_empty_the_spool(
    tmp_path: Path, mqtt_broker: str, mqtt_prefix: str, hive_factory, agent_factory
) -> None:
    db = f"sqlite:///{tmp_path / 'hive.db'}"
    config = hive_config(tmp_path, db, mqtt_broker, mqtt_prefix)
    config.mqtt.persistent_session = False
    hive = await hive_factory(config)
    running = await agent_factory(agent_config(tmp_path, mqtt_broker, mqtt_prefix))
    agent = running.agent
    for n in range(2000):
        agent.put(marker(agent, n))
    # Markers only: the /proc sensor may report a process of this machine.
    await until(lambda: len(arrivals(tmp_path / "hive.db")) == 2000)
    await until(lambda: agent.spool is not None and len(agent.spool) == 0)
    assert hive.metrics.get("mqtt.receipts") >= 1
    await until(
        lambda: (
            hive.store.agents()
            and hive.store.agents()[0]["data"].get("spool") is not None
        )
    )
    await running.stop()
    assert agent.metrics.get("agent.resent") == 0


@pytest.mark.mqtt
async def test_delivery_hive_stopped_30s_spool_holds_and_all_arrive_in_order(
    tmp_path: Path, mosquitto, hive_factory, agent_factory
) -> None:
    broker = mosquitto()
    prefix = "immune/v1"
    db = f"sqlite:///{tmp_path / 'hive.db'}"
    config = hive_config(tmp_path, db, broker.url, prefix)
    hive = await hive_factory(config)
    running = await agent_factory(
        agent_config(tmp_path, broker.url, prefix, spool_window=4, batch_max_events=50)
    )
    agent = running.agent
    produced = 0

    async def produce(seconds: float, rate: int = 200) -> None:
        nonlocal produced
        end = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < end:
            for _ in range(rate // 20):
                agent.put(marker(agent, produced))
                produced += 1
            await asyncio.sleep(0.05)

    await produce(2)
    await hive.stop()
    hive.store.close()
    await produce(OUTAGE)
    # The broker queued at most the window for the absent hive; the spool
    # holds the rest, and nothing was dropped.
    assert len(agent.spool) >= produced - 2 * 50 * 4 - 400
    assert agent.metrics.get("agent.spool_dropped") == 0

    hive = await hive_factory(config)
    await produce(1)
    await until(lambda: len(arrivals(tmp_path / "hive.db")) == produced, timeout=60)
    await until(lambda: len(agent.spool) == 0)
    rows = arrivals(tmp_path / "hive.db")
    assert [marker for marker, _ in rows] == list(range(produced))
    arrival = [received for _, received in rows]
    assert arrival == sorted(arrival), "events arrived out of order"


@pytest.mark.mqtt
async def test_delivery_broker_restart_mid_100k_stored_exactly_once(
    tmp_path: Path, mosquitto, hive_factory, agent_factory
) -> None:
    broker = mosquitto()
    prefix = "immune/v1"
    db = f"sqlite:///{tmp_path / 'hive.db'}"
    config = hive_config(tmp_path, db, broker.url, prefix)
    hive = await hive_factory(config)
    running = await agent_factory(agent_config(tmp_path, broker.url, prefix))
    agent = running.agent
    total = 100_000
    for n in range(total):
        agent.put(marker(agent, n))
        if n % 2000 == 1999:
            await asyncio.sleep(0.01)
        if n == 30_000:
            broker.stop()
            await asyncio.sleep(1.0)
            broker.start()
    await until(lambda: len(arrivals(tmp_path / "hive.db")) >= total, timeout=120)
    await until(lambda: len(agent.spool) == 0, timeout=30)
    await hive.store.flush()
    markers = [m for m, _ in arrivals(tmp_path / "hive.db")]
    assert markers == list(range(total))  # each once, none missing
    assert agent.metrics.get("agent.reconnects") >= 1
    assert hive.metrics.get("mqtt.disconnects") >= 1
    assert agent.metrics.get("agent.spool_dropped") == 0


async def test_receipt_before_puback_leaves_nothing_in_flight(tmp_path: Path) -> None:
    # A fast hive can store and receipt a batch before the broker's PUBACK
    # reaches the agent: the batch must not stay "in flight" (it would hold
    # a window slot until receipt_timeout).
    config = agent_config(tmp_path, "mqtt://127.0.0.1:1", "p", spool_window=2)
    agent = Agent(config)
    agent.spool = agent._open_spool()
    agent._append([agent.encode_event(marker(agent, n)) for n in range(3)])
    agent._spooler_done = True
    agent.shutdown_timeout = 0.2

    class HiveBeforePuback:
        async def publish(self, topic: str, payload: bytes, qos: int) -> None:
            seq = orjson.loads(payload)["seq"]
            agent._receipt(orjson.dumps({"v": 1, "seq": seq}))

    await asyncio.wait_for(agent._batches(HiveBeforePuback()), 5)  # type: ignore[arg-type]
    assert agent._inflight == {} and len(agent.spool) == 0
