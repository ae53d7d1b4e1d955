"""The agent keeps every MQTT message under its byte limit, losing nothing.

Events go through the spool: encoded one by one (shortened if one alone is
too big), then read back in batches that fit ``batch_max_bytes``.
"""

from __future__ import annotations

import orjson

from immune import config as config_mod
from immune.agent.agent import ENVELOPE_BYTES, Agent
from immune.agent.spool import Spool
from immune.events import Event, decode_batch, new_id, now_ns


def ev(argv: list[str]) -> Event:
    return Event(
        id=new_id(), agent_id="a1", host="h", ts=now_ns(), kind="exec", argv=argv
    )


def agent(limit: int) -> Agent:
    config = config_mod.load(environ={})
    config.agent.id = "a1"
    config.agent.batch_max_bytes = limit
    return Agent(config)


def batches(a: Agent, events: list[Event]) -> list[bytes]:
    """The payloads the agent would publish for these events, in order."""
    spool = Spool(":memory:", 10_000)
    spool.append([a.encode_event(e) for e in events])
    limit = a.config.agent.batch_max_bytes - ENVELOPE_BYTES
    payloads, cursor = [], 0
    while rows := spool.read(cursor, max_events=500, max_bytes=limit):
        payloads.append(a.batch_payload(rows))
        cursor = rows[-1][0]
    return payloads


async def test_batching_splits_a_large_batch_in_order() -> None:
    events = [ev(["x" * 1000, str(i)]) for i in range(50)]
    payloads = batches(agent(8192), events)
    assert len(payloads) > 1
    assert all(len(p) <= 8192 for p in payloads)
    received: list[Event] = []
    seqs = []
    for payload in payloads:
        seqs.append(orjson.loads(payload)["seq"])
        good, bad = decode_batch(payload, max_bytes=1 << 20, agent_id="a1")
        assert bad == []
        received += good
    assert received == events
    # Consecutive, gapless spool ranges: a receipt names exactly one batch.
    assert seqs[0][0] == 1 and seqs[-1][1] == 50
    assert all(b[0] == a[1] + 1 for a, b in zip(seqs, seqs[1:], strict=False))


async def test_batching_shortens_a_lone_event_too_big_to_send() -> None:
    huge = ev(["java", "-cp", *["/opt/lib/" + "a" * 4000 + ".jar"] * 200])
    a = agent(16384)
    (payload,) = batches(a, [huge])
    assert len(payload) <= 16384
    (event,), bad = decode_batch(payload, max_bytes=1 << 20, agent_id="a1")
    assert bad == []
    assert event.id == huge.id
    assert event.argv[:2] == ["java", "-cp"]
    assert event.extra == {"truncated": f"argv: 202 arguments, {len(event.argv)} kept"}
    assert a.metrics.get("agent.events_shortened") == 1
    assert orjson.loads(payload)["events"][0]["extra"]["truncated"]
