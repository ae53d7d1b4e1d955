"""The MQTT contract: what the code really sends validates against the
shipped JSON Schemas, and the doc alone is enough to publish events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

import aiomqtt
import jsonschema
import msgspec
import pytest

from immune import signing
from immune.events import Alert, Event, new_id, now_ns
from immune.mqtt import parse_url

from .conftest import agent_config, hive_config, until

DOCS = Path(__file__).parents[2] / "docs"
SECOND = 10**9


def schema(name: str) -> dict[str, Any]:
    text = (resources.files("immune") / "schemas" / f"{name}-v1.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def validate(name: str, payload: Any) -> None:
    jsonschema.validate(payload, schema(name), cls=jsonschema.Draft202012Validator)


def schema_for(prefix: str, topic: str) -> str:
    leaf = topic.rsplit("/", 1)[1]
    if topic.startswith(f"{prefix}/alerts/"):
        return "alert"
    if topic == f"{prefix}/hive/status":
        return "hive-status"
    return {
        "events": "events",
        "register": "register",
        "heartbeat": "heartbeat",
        "status": "status",
        "receipts": "receipt",
        "commands": "command",
        "acks": "ack",
    }[leaf]


def test_schemas_are_valid_json_schemas() -> None:
    names = [p.name for p in (resources.files("immune") / "schemas").iterdir()]
    assert len(names) == 10
    for name in names:
        jsonschema.Draft202012Validator.check_schema(schema(name[: -len("-v1.json")]))


def test_schema_of_events_and_alerts_follows_the_model() -> None:
    # The event and alert schemas are the models' own (msgspec), so they
    # cannot drift from what the hive accepts.
    for model, shipped in (
        (Event, schema("events")["$defs"]["Event"]),
        (Alert, schema("alert")),
    ):
        generated = msgspec.json.schema(model)["$defs"][model.__name__]
        generated.pop("description", None)
        assert generated["properties"] == shipped["properties"]
        assert generated.get("required") == shipped.get("required")


def test_schema_refuses_what_the_hive_refuses() -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate("events", {"events": [{"id": "x", "agent_id": "a", "kind": "exec"}]})
    with pytest.raises(jsonschema.ValidationError):
        validate("ack", {"id": "c1", "agent_id": "a", "state": "maybe"})


def test_doc_examples_validate() -> None:
    text = (DOCS / "mqtt.md").read_text(encoding="utf-8")
    found = {}
    for body in re.findall(r"```json\n(.*?)```", text, re.S):
        payload = json.loads(body)
        name = (
            "events"
            if "events" in payload
            else "receipt"
            if set(payload) == {"v", "agent_id", "seq"}
            else "register"
            if "hostname" in payload
            else "heartbeat"
            if "counters" in payload
            else "command"
            if "sig" in payload
            else "ack"
            if "state" in payload
            else "alert"
        )
        validate(name, payload)
        found[name] = payload
    assert set(found) == {
        "events",
        "receipt",
        "register",
        "heartbeat",
        "command",
        "ack",
        "alert",
    }
    validate("command-body", json.loads(found["command"]["body"]))


@contextlib.asynccontextmanager
async def recorder(url: str, prefix: str) -> AsyncIterator[list[tuple[str, bytes]]]:
    address = parse_url(url)
    seen: list[tuple[str, bytes]] = []
    async with aiomqtt.Client(address.host, address.port) as client:
        await client.subscribe(f"{prefix}/#", qos=1)

        async def pump() -> None:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                seen.append((str(message.topic), message.payload))

        task = asyncio.create_task(pump())
        try:
            yield seen
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.mark.mqtt
async def test_everything_the_code_sends_validates(
    tmp_path: Path, mqtt_broker: str, mqtt_prefix: str, hive_factory, agent_factory
) -> None:
    config = hive_config(
        tmp_path, f"sqlite:///{tmp_path / 'hive.db'}", mqtt_broker, mqtt_prefix
    )
    config.mqtt.persistent_session = False
    async with recorder(mqtt_broker, mqtt_prefix) as seen:
        hive = await hive_factory(config)
        key = signing.load_or_create_key(config.hive.command_key)
        (tmp_path / "hive.pub").write_bytes(signing.public_pem(key))
        running = await agent_factory(
            agent_config(
                tmp_path,
                mqtt_broker,
                mqtt_prefix,
                command_public_key=str(tmp_path / "hive.pub"),
            )
        )
        agent = running.agent
        # An exec from /tmp: an event, then an alert for integrators.
        agent.put(
            Event(
                id=new_id(),
                agent_id=agent.agent_id,
                host=agent.host,
                ts=now_ns(),
                kind="exec",
                pid=7,
                exe="/tmp/dropper",
                argv=["/tmp/dropper"],
                sensor="test",
            )
        )
        ok, bad = new_id(), new_id()
        for command_id, action in ((ok, "ping"), (bad, "no_such_action")):
            await hive.publish(
                "command.send",
                {
                    "id": command_id,
                    "agent_id": agent.agent_id,
                    "action": action,
                    "args": {},
                    "expires_ns": now_ns() + 30 * SECOND,
                    "origin": "test",
                    "alert_id": None,
                },
            )
        await until(lambda: (hive.store.command(bad) or {}).get("state") == "refused")
        await until(lambda: (hive.store.command(ok) or {}).get("state") == "succeeded")
        await until(lambda: any("/heartbeat" in t for t, _ in seen))
        await until(lambda: any("/alerts/" in t for t, _ in seen))
        await running.stop()
        await until(lambda: any(b'"stopped"' in p for _, p in seen))
        await hive.stop()
        await until(
            lambda: any(t.endswith("hive/status") and b"offline" in p for t, p in seen)
        )

    kinds: dict[str, int] = {}
    for topic, payload in seen:
        if not payload:
            continue  # a cleared retained message
        name = schema_for(mqtt_prefix, topic)
        message = json.loads(payload)
        validate(name, message)
        if name == "command":
            validate("command-body", json.loads(message["body"]))
        kinds[name] = kinds.get(name, 0) + 1
    assert set(kinds) == {
        "events",
        "register",
        "heartbeat",
        "status",
        "receipt",
        "command",
        "ack",
        "alert",
        "hive-status",
    }


@pytest.mark.mqtt
async def test_mosquitto_pub_following_the_doc_stores_the_event(
    tmp_path: Path, mqtt_broker: str, mqtt_prefix: str, hive_factory
) -> None:
    if shutil.which("mosquitto_pub") is None:
        pytest.skip(
            "mosquitto_pub (mosquitto-clients) is not installed: no MQTT client"
        )
    config = hive_config(
        tmp_path, f"sqlite:///{tmp_path / 'hive.db'}", mqtt_broker, mqtt_prefix
    )
    config.mqtt.persistent_session = False
    hive = await hive_factory(config)
    text = (DOCS / "mqtt.md").read_text(encoding="utf-8")
    section = text.split("## Publishing from your own producer", 1)[1]
    (script,) = re.findall(r"```sh\n(.*?)```", section, re.S)[:1]
    address = parse_url(mqtt_broker)
    # The doc's script as written, on this test's broker port and prefix.
    script = script.replace("-h 127.0.0.1", f"-h 127.0.0.1 -p {address.port}")
    script = script.replace("immune/v1/", f"{mqtt_prefix}/")
    done = await asyncio.to_thread(
        subprocess.run, ["bash", "-euc", script], capture_output=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    await until(lambda: hive.store.counts()["events"] == 1)
    (event,) = hive.store.events()
    assert event["agent_id"] == "lab-1" and event["exe"] == "/dev/shm/miner"
    await until(lambda: bool(hive.store.alerts()))
    assert hive.store.alerts()[0]["rule"] == "exec-from-temp-dir"
