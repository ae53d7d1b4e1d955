"""Payloads that once stopped the hive's MQTT ingestion or its storage for good.

Invalid UTF-8 inside a JSON string and JSON nested deeper than the decoder's
recursion limit passed the envelope checks and then raised something other
than a validation error, which ended the network plugin's task: the hive kept
running but stored nothing more. An integer beyond 64 bits passed validation
and then failed in the storage writer on every retry. Each must become a dead
letter with a reason while good events keep flowing.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from immune import config as config_mod
from immune.errors import EventError
from immune.events import decode_batch, encode, new_id, now_ns
from immune.hive import Hive
from immune.mqtt import parse_url


def _raw_event(event_id: str, host: bytes = b"h") -> bytes:
    return (
        b'{"id":"' + event_id.encode() + b'","agent_id":"web-1","host":"' + host + b'",'
        b'"ts":' + str(now_ns()).encode() + b',"kind":"exec"}'
    )


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_hostile_invalid_utf8_in_one_event_refuses_that_event_only() -> None:
    broken = _raw_event("bad-1", b"h\xff")
    payload = b'{"events":[' + broken + b"," + _raw_event("ok-1") + b"]}"
    good, bad = decode_batch(payload, max_bytes=1 << 20, agent_id="web-1")
    assert [e.id for e in good] == ["ok-1"]
    assert [r.reason for r in bad] == [
        "event at $.events[0] is not valid JSON: Invalid UTF-8 encoded string"
    ]
    assert bad[0].raw == broken


def test_hostile_invalid_utf8_in_a_lone_event_is_refused_with_a_reason() -> None:
    good, bad = decode_batch(_raw_event("bad-2", b"\xc3"), max_bytes=1 << 20)
    assert good == []
    assert [r.reason for r in bad] == [
        "event at $ is not valid JSON: Invalid UTF-8 encoded string"
    ]


@pytest.mark.parametrize(
    "payload",
    [
        b'{"events":' + _nested(100_000) + b"}",
        _raw_event("deep-1")[:-1] + b',"extra_field":' + _nested(20_000) + b"}",
        b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
    ],
    ids=["events-array", "unknown-field", "objects"],
)
def test_hostile_deep_nesting_is_refused_whole_with_a_reason(payload: bytes) -> None:
    with pytest.raises(EventError) as info:
        decode_batch(payload, max_bytes=1 << 20)
    assert info.value.reason == "payload is nested too deeply to decode"


@pytest.mark.parametrize(
    ("field", "path"),
    [
        (b'"extra":{"k":99999999999999999999999}', "$.extra[...]"),
        (b'"extra":{"k":-9223372036854775809}', "$.extra[...]"),
        (b'"exit_code":18446744073709551616', "$.exit_code"),
    ],
)
def test_hostile_integer_beyond_64_bits_is_refused_at_the_door(
    field: bytes, path: str
) -> None:
    # Such an integer used to pass validation and then fail in the storage
    # writer on every retry, so that nothing after it was ever stored.
    payload = _raw_event("big-1")[:-1] + b"," + field + b"}"
    good, bad = decode_batch(payload, max_bytes=1 << 20)
    assert good == []
    assert len(bad) == 1
    assert bad[0].reason.endswith(f"at {path}")
    assert "922337203685477580" in bad[0].reason


def _mosquitto_pub(broker: str, topic: str, path: Path) -> None:
    address = parse_url(broker)
    cmd = ["mosquitto_pub", "-h", address.host, "-p", str(address.port), "-q", "1"]
    subprocess.run([*cmd, "-t", topic, "-f", str(path)], check=True, timeout=10)


async def _until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


@pytest.mark.mqtt
@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="needs mosquitto_pub")
async def test_hostile_payloads_from_mosquitto_pub_do_not_stop_ingestion(
    tmp_path: Path, mqtt_broker: str, mqtt_prefix: str
) -> None:
    config = config_mod.load(environ={})
    config.hive.database = f"sqlite:///{tmp_path / 'hive.db'}"
    config.mqtt.url = mqtt_broker
    config.mqtt.topic_prefix = mqtt_prefix
    config.mqtt.persistent_session = False
    config.mqtt.client_id = f"immune-test-{uuid.uuid4().hex[:12]}"
    config.plugins["alert"] = {"console": False, "file": ""}
    config.hive.shutdown_timeout = 2
    hive = Hive(config)
    await hive.start()
    try:
        network = next(p.obj for p in hive.plugins.list() if p.name == "network")
        await asyncio.wait_for(network.connected.wait(), 10)
        events = f"{mqtt_prefix}/agents/web-1/events"
        register = f"{mqtt_prefix}/agents/web-1/register"
        big = _raw_event("big-int")[:-1] + b',"extra":{"k":' + b"9" * 30 + b"}}"
        hostile = {
            "utf8.json": (events, _raw_event("bad-utf8", b"h\xff\xfe")),
            "big.json": (events, big),
            "deep.json": (events, b'{"events":[' + _nested(20_000) + b"]}"),
            "big-heartbeat.json": (
                f"{mqtt_prefix}/agents/web-1/heartbeat",
                b'{"agent_id":"web-1","counters":{"sent":' + b"9" * 30 + b"}}",
            ),
            "deep-register.json": (
                register,
                b'{"agent_id":"web-1","x":' + _nested(20_000) + b"}",
            ),
        }
        for name, (topic, body) in hostile.items():
            (tmp_path / name).write_bytes(body)
            await asyncio.to_thread(_mosquitto_pub, mqtt_broker, topic, tmp_path / name)
        good_id = new_id()
        good = {"id": good_id, "agent_id": "web-1", "host": "h", "ts": now_ns()}
        (tmp_path / "good.json").write_bytes(encode({**good, "kind": "exec"}))
        await asyncio.to_thread(
            _mosquitto_pub, mqtt_broker, events, tmp_path / "good.json"
        )

        await _until(lambda: hive.metrics.get("events.accepted") == 1)
        await _until(lambda: hive.metrics.get("deadletters") == 5)
        await hive.bus.join()
        await asyncio.wait_for(hive.store.flush(), 10)
        assert [e["id"] for e in hive.store.events()] == [good_id]
        reasons = sorted(d["reason"] for d in hive.store.dead_letters())
        assert reasons == [
            "Expected `int` <= 9223372036854775807 at $.extra[...]",
            "event at $ is not valid JSON: Invalid UTF-8 encoded string",
            "invalid heartbeat message: Expected `int` <= 9223372036854775807 - at "
            "`$.counters[...]`",
            "payload is nested too deeply to decode",
            "register message is nested too deeply to decode",
        ]
        assert hive.metrics.get("mqtt.handler_errors") == 0
    finally:
        await hive.stop()
        hive.store.close()
