"""The agent keeps every MQTT message under its byte limit, losing nothing."""

from __future__ import annotations

import orjson

from immune import config as config_mod
from immune.agent.agent import Agent
from immune.events import Event, decode_batch, new_id, now_ns


class Recorder:
    """Stands in for the MQTT client: records what would be published."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []

    async def publish(self, topic: str, payload: bytes, qos: int) -> None:
        self.payloads.append(payload)


def ev(argv: list[str]) -> Event:
    return Event(
        id=new_id(), agent_id="a1", host="h", ts=now_ns(), kind="exec", argv=argv
    )


def agent(limit: int) -> Agent:
    config = config_mod.load(environ={})
    config.agent.id = "a1"
    config.agent.batch_max_bytes = limit
    return Agent(config)


async def test_batching_splits_a_large_batch_in_order() -> None:
    events = [ev(["x" * 1000, str(i)]) for i in range(50)]
    client = Recorder()
    await agent(8192)._publish_batch(client, "t", events)
    assert len(client.payloads) > 1
    assert all(len(p) <= 8192 for p in client.payloads)
    received: list[Event] = []
    for payload in client.payloads:
        good, bad = decode_batch(payload, max_bytes=1 << 20, agent_id="a1")
        assert bad == []
        received += good
    assert received == events


async def test_batching_shortens_a_lone_event_too_big_to_send() -> None:
    huge = ev(["java", "-cp", *["/opt/lib/" + "a" * 4000 + ".jar"] * 200])
    client = Recorder()
    a = agent(16384)
    await a._publish_batch(client, "t", [huge])
    (payload,) = client.payloads
    assert len(payload) <= 16384
    (event,), bad = decode_batch(payload, max_bytes=1 << 20, agent_id="a1")
    assert bad == []
    assert event.id == huge.id
    assert event.argv[:2] == ["java", "-cp"]
    assert event.extra == {"truncated": f"argv: 202 arguments, {len(event.argv)} kept"}
    assert a.metrics.get("agent.events_shortened") == 1
    assert orjson.loads(payload)["events"][0]["extra"]["truncated"]
