"""A seq beyond 64 bits from one agent must not stop receipts for all."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiomqtt
import orjson
import pytest

from immune.events import Event, encode, new_id, now_ns
from immune.mqtt import parse_url

from .conftest import hive_config

pytestmark = pytest.mark.mqtt


async def test_huge_seq_does_not_stop_receipts(
    tmp_path: Path, mqtt_broker: str, mqtt_prefix: str, hive_factory
) -> None:
    config = hive_config(
        tmp_path, f"sqlite:///{tmp_path / 'hive.db'}", mqtt_broker, mqtt_prefix
    )
    config.mqtt.persistent_session = False
    hive = await hive_factory(config)

    def batch(agent: str, seq: bytes) -> bytes:
        event = Event(id=new_id(), agent_id=agent, host="h", ts=now_ns(), kind="exec")
        return b'{"v":1,"seq":' + seq + b',"events":[' + encode(event) + b"]}"

    address = parse_url(mqtt_broker)
    async with aiomqtt.Client(address.host, address.port) as client:
        await client.subscribe(f"{mqtt_prefix}/agents/good-1/receipts", qos=1)
        await client.publish(
            f"{mqtt_prefix}/agents/evil-1/events",
            batch("evil-1", b"[18446744073709551616,18446744073709551617]"),
            qos=1,
        )
        await asyncio.sleep(0.5)
        await client.publish(
            f"{mqtt_prefix}/agents/good-1/events", batch("good-1", b"[1,1]"), qos=1
        )
        async with asyncio.timeout(5):
            message = await anext(aiter(client.messages))
    assert orjson.loads(message.payload)["seq"] == [1, 1]
    assert hive.metrics.get("hive.task_errors") == 0
