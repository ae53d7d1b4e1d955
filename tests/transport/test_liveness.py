"""Agents online and offline, floods, and losses reported by agents."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
from pathlib import Path

import aiomqtt
import orjson
import pytest

from immune.events import Event, encode, new_id, now_ns
from immune.mqtt import Backoff, parse_url

from .conftest import hive_config, until

pytestmark = pytest.mark.mqtt


def test_backoff_grows_with_jitter_and_logs_less_over_time() -> None:
    backoff = Backoff(initial=0.5, cap=30.0)
    levels, delays = [], []
    for _ in range(40):
        levels.append(backoff.level())
        delays.append(backoff.next())
    assert levels[:3] == [logging.WARNING] * 3 and levels[5] == logging.DEBUG
    assert levels[10] == logging.WARNING and levels[20] == logging.WARNING
    assert 0.25 <= delays[0] <= 0.5 and all(15 <= d <= 30 for d in delays[10:])
    assert len(set(delays[10:])) > 1  # jittered
    backoff.reset()
    assert backoff.next() <= 0.5


async def publish(url: str, topic: str, payloads: list[bytes]) -> None:
    address = parse_url(url)
    async with aiomqtt.Client(address.host, address.port) as client:
        for payload in payloads:
            await client.publish(topic, payload, qos=1)


@pytest.fixture
async def hive(tmp_path: Path, mqtt_broker: str, mqtt_prefix: str, hive_factory):
    config = hive_config(
        tmp_path, f"sqlite:///{tmp_path / 'hive.db'}", mqtt_broker, mqtt_prefix
    )
    config.mqtt.persistent_session = False
    config.hive.agent_timeout = 1.0
    config.hive.offline_check_interval = 0.2
    config.hive.agent_rate_limit = 5.0
    config.hive.agent_rate_burst = 10
    return await hive_factory(config)


def status(hive, agent_id: str) -> str | None:
    rows = [a for a in hive.store.agents() if a["id"] == agent_id]
    return rows[0]["status"] if rows else None


async def test_silent_agent_goes_offline_and_comes_back(
    hive, mqtt_broker: str, mqtt_prefix: str
) -> None:
    base = f"{mqtt_prefix}/agents/quiet-1"
    offline: list[object] = []
    hive.bus.subscribe("agent.offline", offline.append, owner="test")
    await publish(mqtt_broker, f"{base}/register", [b'{"agent_id": "quiet-1"}'])
    await until(lambda: status(hive, "quiet-1") == "online")
    await until(lambda: status(hive, "quiet-1") == "offline", timeout=5)
    # The row is marked before agent.offline is published: wait for it.
    await until(lambda: len(offline) >= 1)
    assert len(offline) == 1
    await publish(mqtt_broker, f"{base}/heartbeat", [b'{"agent_id": "quiet-1"}'])
    await until(lambda: status(hive, "quiet-1") == "online")


async def test_last_will_marks_a_vanished_agent_offline(
    hive, mqtt_broker: str, mqtt_prefix: str
) -> None:
    if shutil.which("mosquitto_pub") is None:
        pytest.skip(
            "mosquitto_pub (mosquitto-clients) is not installed: no MQTT client"
        )
    base = f"{mqtt_prefix}/agents/will-1"
    address = parse_url(mqtt_broker)
    will = orjson.dumps({"status": "offline", "agent_id": "will-1", "reason": "lost"})
    # A client that stays connected (-l reads lines) and then dies unclean.
    proc = subprocess.Popen(
        [
            "mosquitto_pub",
            "-h",
            address.host,
            "-p",
            str(address.port),
            "-q",
            "1",
            "-t",
            f"{base}/heartbeat",
            "-l",
            "--will-topic",
            f"{base}/status",
            "--will-payload",
            will.decode(),
            "--will-qos",
            "1",
        ],
        stdin=subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write(b'{"agent_id": "will-1"}\n')
        proc.stdin.flush()
        await until(lambda: status(hive, "will-1") == "online")
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
    await until(lambda: status(hive, "will-1") == "offline", timeout=15)


async def test_flood_is_cut_counted_and_alerted_once(
    hive, mqtt_broker: str, mqtt_prefix: str
) -> None:
    topic = f"{mqtt_prefix}/agents/loud-1/heartbeat"
    await publish(mqtt_broker, topic, [b'{"agent_id": "loud-1"}'] * 40)
    await until(lambda: hive.metrics.get("mqtt.messages") >= 40)
    assert hive.metrics.get("mqtt.rate_limited") >= 20
    await hive.store.flush()
    await until(lambda: len(hive.store.alerts()) >= 1)
    (alert,) = hive.store.alerts()
    assert alert["rule"] == "mqtt-agent-flood" and alert["data"]["agent_id"] == "loud-1"


async def test_spool_losses_of_an_agent_raise_an_alert(
    hive, mqtt_broker: str, mqtt_prefix: str
) -> None:
    topic = f"{mqtt_prefix}/agents/lossy-1/heartbeat"
    beat = {"agent_id": "lossy-1", "spool": {"depth": 10, "dropped": 7}}
    await publish(mqtt_broker, topic, [orjson.dumps(beat), orjson.dumps(beat)])
    await until(lambda: hive.metrics.get("agents.spool_dropped") == 7)
    await hive.store.flush()
    await until(lambda: len(hive.store.alerts()) == 1)
    (alert,) = hive.store.alerts()
    assert alert["rule"] == "agent-spool-overflow" and alert["data"]["dropped"] == 7


async def test_oversized_ack_is_a_dead_letter(
    hive, mqtt_broker: str, mqtt_prefix: str
) -> None:
    # Acks carry results (a process's evidence), so they may be as large as
    # an event batch ([hive] max_payload_bytes), but no larger.
    topic = f"{mqtt_prefix}/agents/big-1/acks"
    size = hive.config.hive.max_payload_bytes + 1
    await publish(mqtt_broker, topic, [b"x" * size])
    await until(lambda: hive.metrics.get("agents.rejected") == 1)
    await hive.store.flush()
    (letter,) = hive.store.dead_letters()
    assert f"acks payload of {size} bytes exceeds" in letter["reason"]


async def test_oversized_heartbeat_is_a_dead_letter(
    hive, mqtt_broker: str, mqtt_prefix: str
) -> None:
    topic = f"{mqtt_prefix}/agents/big-1/heartbeat"
    await publish(mqtt_broker, topic, [b"x" * (65 * 1024)])
    await until(lambda: hive.metrics.get("agents.rejected") == 1)
    await hive.store.flush()
    (letter,) = hive.store.dead_letters()
    assert "heartbeat payload of 66560 bytes exceeds 65536" in letter["reason"]


async def test_status_of_unknown_value_is_a_dead_letter_not_online(
    hive, mqtt_broker: str, mqtt_prefix: str
) -> None:
    topic = f"{mqtt_prefix}/agents/odd-1/status"
    await publish(mqtt_broker, topic, [b'{"agent_id": "odd-1", "status": "asleep"}'])
    await until(lambda: hive.metrics.get("agents.rejected") == 1)
    await hive.store.flush()
    (letter,) = hive.store.dead_letters()
    assert "invalid status message" in letter["reason"]
    assert "$.status" in letter["reason"]
    assert status(hive, "odd-1") is None
    assert hive.agent_status.get("odd-1") is None


async def test_batch_without_seq_gets_no_receipt_but_is_stored(
    hive, mqtt_broker: str, mqtt_prefix: str
) -> None:
    event = Event(id=new_id(), agent_id="plain-1", host="h", ts=now_ns(), kind="exec")
    await publish(mqtt_broker, f"{mqtt_prefix}/agents/plain-1/events", [encode(event)])
    await until(lambda: hive.store.counts()["events"] == 1)
    await asyncio.sleep(0.2)
    assert hive.metrics.get("mqtt.receipts") == 0


async def test_batch_refused_whole_is_still_receipted(
    hive, mqtt_broker: str, mqtt_prefix: str
) -> None:
    # Too large for the hive: a dead letter, and a receipt so that the agent
    # does not send it forever.
    hive.config.hive.max_payload_bytes = 1000
    event = Event(id=new_id(), agent_id="big-2", host="h", ts=now_ns(), kind="exec")
    payload = encode(
        {"v": 1, "agent_id": "big-2", "seq": [5, 9], "events": [event] * 20}
    )
    assert len(payload) > 1000
    base = f"{mqtt_prefix}/agents/big-2"
    address = parse_url(mqtt_broker)
    async with aiomqtt.Client(address.host, address.port) as client:
        await client.subscribe(f"{base}/receipts", qos=1)
        await client.publish(f"{base}/events", payload, qos=1)
        async with asyncio.timeout(5):
            message = await anext(aiter(client.messages))
    assert orjson.loads(message.payload)["seq"] == [5, 9]
    await hive.store.flush()
    (letter,) = hive.store.dead_letters()
    assert "exceeds the limit" in letter["reason"]
