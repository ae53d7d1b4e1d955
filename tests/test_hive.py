"""The hive end to end: a real broker, real databases, real plugins."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest

from immune import config as config_mod
from immune import hookimpl
from immune.config import Config
from immune.events import Event, encode, new_id, now_ns
from immune.hive import Hive
from immune.mqtt import parse_url

pytestmark = pytest.mark.mqtt


def make_config(tmp_path: Path, db_url: str, broker: str, prefix: str) -> Config:
    config = config_mod.load(environ={})
    config.hive.database = db_url
    config.mqtt.url = broker
    config.mqtt.topic_prefix = prefix
    config.mqtt.persistent_session = False
    config.mqtt.client_id = f"immune-test-{uuid.uuid4().hex[:12]}"
    config.plugins["alert"] = {"console": False, "file": str(tmp_path / "alerts.log")}
    return config


def ev(agent: str = "web-1", **fields: Any) -> Event:
    base: dict[str, Any] = {"kind": "exec", "pid": 42, "ppid": 1, "uid": 1000}
    base.update(fields)
    return Event(id=new_id(), agent_id=agent, host=f"{agent}.test", ts=now_ns(), **base)


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until check() holds, failing after timeout seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


async def connected(hive: Hive) -> None:
    network = next(p.obj for p in hive.plugins.list() if p.name == "network")
    await asyncio.wait_for(network.connected.wait(), 10)


@pytest.fixture
async def running(
    tmp_path: Path, mqtt_broker: str, mqtt_prefix: str
) -> AsyncIterator[Callable[..., Any]]:
    """Start hives on this test's prefix; each is stopped at the end."""
    hives: list[Hive] = []

    async def start(db_url: str | None = None, **kwargs: Any) -> Hive:
        url = db_url or f"sqlite:///{tmp_path / 'hive.db'}"
        hive = Hive(make_config(tmp_path, url, mqtt_broker, mqtt_prefix), **kwargs)
        await hive.start()
        hives.append(hive)
        await connected(hive)
        return hive

    yield start
    for hive in hives:
        if not hive.stopping.is_set():
            await hive.stop()
        hive.store.close()


async def publish(broker: str, topic: str, payload: bytes) -> None:
    address = parse_url(broker)
    async with aiomqtt.Client(address.host, address.port) as client:
        await client.publish(topic, payload, qos=1)


@pytest.mark.parametrize(
    "db", ["sqlite", pytest.param("pg", marks=pytest.mark.postgres)]
)
async def test_hive_stores_events_from_mqtt_and_raises_alerts(
    db: str, running, mqtt_broker: str, mqtt_prefix: str, request
) -> None:
    db_url = request.getfixturevalue("pg_url") if db == "pg" else None
    hive = await running(db_url)
    events = [
        ev(exe="/usr/bin/ls", argv=["ls", "-l"]),
        ev(exe="/tmp/x", argv=["/tmp/x"]),
        ev("web-1", kind="setuid", uid=0, euid=0, old_euid=1000),
    ]
    payload = encode({"v": 1, "agent_id": "web-1", "events": events})
    topic = f"{mqtt_prefix}/agents/web-1/events"
    await publish(mqtt_broker, topic, payload)
    await publish(mqtt_broker, topic, payload)  # redelivered: stored once

    store = hive.store
    await until(lambda: hive.metrics.get("events.accepted") == 6)
    await hive.bus.join()
    await store.flush()
    stored = store.events(agent_id="web-1")
    assert sorted(e["id"] for e in stored) == sorted(e.id for e in events)
    assert {e["exe"] for e in stored if e["kind"] == "exec"} == {
        "/usr/bin/ls",
        "/tmp/x",
    }
    # Each delivery is examined; the redelivered events fold into the alerts
    # they already raised, which count them once. One event, one alert: the
    # default rules detect these two, the exploit catalogue leaves them be.
    found = sorted((a["plugin"], a["rule"], a["count"]) for a in store.alerts())
    assert found == [
        ("rules", "exec-from-temp-dir", 1),
        ("rules", "setuid-to-root", 1),
    ]
    assert hive.metrics.get("alerts.redelivered") == 2
    agents = {a["id"]: a for a in store.agents()}
    assert agents["web-1"]["status"] == "online"
    await hive.stop()  # here, while the test's database still exists


def _mosquitto_pub(broker: str, topic: str, *args: str) -> None:
    address = parse_url(broker)
    cmd = ["mosquitto_pub", "-h", address.host, "-p", str(address.port)]
    subprocess.run([*cmd, "-q", "1", "-t", topic, *args], check=True, timeout=10)


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="needs mosquitto_pub")
async def test_hive_survives_bad_payloads_from_mosquitto_pub(
    running, mqtt_broker: str, mqtt_prefix: str, tmp_path: Path
) -> None:
    hive = await running()
    topic = f"{mqtt_prefix}/agents/web-1/events"
    big = tmp_path / "big"
    big.write_bytes(b"a" * (hive.config.hive.max_payload_bytes + 1))
    good = ev(exe="/usr/bin/id")
    bad_batch = {
        "events": [
            {
                "id": "x1",
                "agent_id": "web-1",
                "host": "h",
                "ts": 1,
                "kind": "exec",
                "pid": "twelve",
            },
            {"id": "x2", "agent_id": "other", "host": "h", "ts": 1, "kind": "exec"},
            orjson.loads(encode(good)),
        ]
    }
    await asyncio.to_thread(_mosquitto_pub, mqtt_broker, topic, "-m", "not json")
    await asyncio.to_thread(_mosquitto_pub, mqtt_broker, topic, "-f", str(big))
    await asyncio.to_thread(_mosquitto_pub, mqtt_broker, topic, "-m", "[1,2]")
    await asyncio.to_thread(
        _mosquitto_pub, mqtt_broker, topic, "-m", orjson.dumps(bad_batch).decode()
    )
    register = f"{mqtt_prefix}/agents/web-1/register"
    await asyncio.to_thread(_mosquitto_pub, mqtt_broker, register, "-m", "{]")

    await until(lambda: hive.metrics.get("deadletters") == 6)
    await until(lambda: hive.metrics.get("events.accepted") == 1)
    await hive.bus.join()
    await hive.store.flush()
    reasons = sorted(d["reason"] for d in hive.store.dead_letters())
    size = hive.config.hive.max_payload_bytes + 1
    assert reasons == sorted(
        [
            "Expected `int | null`, got `str` at $.events[0].pid",
            "event at $.events[1] claims agent 'other' but was published on the "
            "topic of agent 'web-1'",
            f"payload of {size} bytes exceeds the limit of {size - 1}",
            "payload is not valid JSON: JSON is malformed: invalid character (byte 4)",
            "payload must be a JSON object, got list",
            "invalid register message: JSON is malformed: object keys must be "
            "strings (byte 1)",
        ]
    )
    assert [e["id"] for e in hive.store.events()] == [good.id]
    assert hive.metrics.get("events.rejected") == 5
    assert hive.metrics.get("agents.rejected") == 1


class Broken:
    """A plugin whose handler always fails."""

    @hookimpl
    def immune_subscriptions(self):
        def boom(event: Event) -> None:
            raise RuntimeError(f"cannot handle {event.id}")

        return [("event.exec", boom)]


class RefusesConfig:
    @hookimpl
    def immune_configure(self, config):
        raise ValueError("threshold must be a number")


class Counter:
    def __init__(self) -> None:
        self.seen: list[str] = []

    @hookimpl
    async def immune_subscriptions(self):
        return [("event.*", lambda e: self.seen.append(e.id))]


async def test_hive_isolates_a_failing_plugin(tmp_path: Path) -> None:
    config = make_config(tmp_path, f"sqlite:///{tmp_path}/h.db", "mqtt://x", "p")
    counter = Counter()
    plugins = [("broken", Broken()), ("refuses", RefusesConfig()), ("counter", counter)]
    hive = Hive(config, plugins=plugins, discover=False)
    await hive.start()
    events = [ev(), ev()]
    await hive.ingest(events)
    await hive.stop()

    assert counter.seen == [e.id for e in events]
    state = {p.name: p for p in hive.plugins.list()}
    assert state["refuses"].state == "failed"
    assert "threshold must be a number" in (state["refuses"].error or "")
    assert state["broken"].state == "stopped"
    assert hive.metrics.get("bus.handler_errors.broken") == 2
    kept = hive.store.dead_letters()
    assert {d["source"] for d in kept} == {"plugin:broken"}
    assert all("RuntimeError: cannot handle" in d["reason"] for d in kept)
    assert hive.metrics.get("deadletters") == len(kept) == 2  # in the status too
    assert len(hive.store.events()) == 2  # storage still got both
    hive.store.close()


async def test_hive_loads_plugin_dirs_and_honours_disabled(tmp_path: Path) -> None:
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "mine.py").write_text(
        "from immune import hookimpl\n\n"
        "@hookimpl\n"
        "def immune_subscriptions(hive):\n"
        "    return [('event.exec', lambda e: None)]\n"
    )
    (plugin_dir / "typo.py").write_text(
        "from immune import hookimpl\n\n"
        "@hookimpl\ndef immune_subscribe(hive):\n    pass\n"
    )
    (plugin_dir / "undecorated.py").write_text("def immune_start(hive):\n    pass\n")
    (plugin_dir / "crash.py").write_text("raise ImportError('missing dependency')\n")
    config = make_config(tmp_path, f"sqlite:///{tmp_path}/h.db", "mqtt://x", "p")
    config.hive.plugin_dirs = [str(plugin_dir)]
    config.hive.disabled_plugins = ["network", "alert"]
    hive = Hive(config)
    infos = {p.name: p for p in await hive.describe_plugins()}

    assert infos["mine"].state == "loaded" and infos["mine"].topics == ["event.exec"]
    assert infos["network"].state == "disabled"
    assert infos["alert"].state == "disabled"
    assert infos["exploit"].state == "loaded"
    assert "no such hook: immune_subscribe" in (infos["typo"].error or "")
    assert "lack the @hookimpl decorator" in (infos["undecorated"].error or "")
    assert "missing dependency" in (infos["crash"].error or "")
    hive.store.close()


async def test_hive_tracks_agent_registration_and_offline_status(
    running, mqtt_broker: str, mqtt_prefix: str
) -> None:
    hive = await running()
    base = f"{mqtt_prefix}/agents/db-7"
    hello = {
        "agent_id": "db-7",
        "hostname": "db-7.test",
        "os": "Linux",
        "version": "0.1.0",
        "sensors": ["cn_proc"],
    }
    await publish(mqtt_broker, f"{base}/register", orjson.dumps(hello))
    await until(lambda: hive.agent_status.get("db-7") == "online")
    agents = {a["id"]: a for a in hive.store.agents()}
    assert agents["db-7"]["hostname"] == "db-7.test"
    assert agents["db-7"]["sensors"] == ["cn_proc"]

    offline = {"agent_id": "db-7", "status": "offline"}
    await publish(mqtt_broker, f"{base}/status", orjson.dumps(offline))
    await until(lambda: hive.agent_status.get("db-7") == "offline")
    assert {a["id"]: a for a in hive.store.agents()}["db-7"]["status"] == "offline"

    # A registration naming another agent than its topic is refused.
    await publish(mqtt_broker, f"{base}/register", orjson.dumps({"agent_id": "x"}))
    await until(lambda: hive.metrics.get("deadletters") == 1)


class BadPattern:
    @hookimpl
    def immune_subscriptions(self):
        return [("event.#.x", lambda message: None)]


async def test_hive_plugin_with_a_malformed_pattern_is_listed_as_failed(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, f"sqlite:///{tmp_path}/h.db", "mqtt://x", "p")
    hive = Hive(config, plugins=[("bad", BadPattern())], discover=False)
    listed = {p.name: p for p in await hive.describe_plugins()}
    assert listed["bad"].state == "failed"
    assert "event.#.x" in (listed["bad"].error or "")
    hive.store.close()


class ExitsInConfigure:
    @hookimpl
    def immune_configure(self):
        raise SystemExit("bye")


async def test_hive_plugin_calling_sys_exit_is_failed_not_the_hive(
    tmp_path: Path,
) -> None:
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "quitter.py").write_text("import sys\nsys.exit(3)\n")
    config = make_config(tmp_path, f"sqlite:///{tmp_path}/h.db", "mqtt://x", "p")
    config.hive.plugin_dirs = [str(plugin_dir)]
    hive = Hive(config, plugins=[("exits", ExitsInConfigure())])
    listed = {p.name: p for p in await hive.describe_plugins()}
    assert listed["exits"].state == "failed" and "bye" in (listed["exits"].error or "")
    assert listed["quitter"].state == "failed" and "3" in (
        listed["quitter"].error or ""
    )
    hive.store.close()


async def test_run_hive_logs_its_status_line(
    tmp_path: Path, mqtt_broker: str, caplog: pytest.LogCaptureFixture
) -> None:
    # `immune hive` has no live table: it says how it is doing in its log.
    from immune.runner import run_hive

    prefix = f"immune-test/{uuid.uuid4().hex}"
    config = make_config(
        tmp_path, f"sqlite:///{tmp_path / 'h.db'}", mqtt_broker, prefix
    )
    stop = asyncio.Event()
    caplog.set_level("INFO", logger="immune.runner")
    task = asyncio.create_task(run_hive(config, stop, status_every=0.1))
    await until(lambda: any("Status:" in r.getMessage() for r in caplog.records))
    stop.set()
    await asyncio.wait_for(task, 30)
    line = next(r.getMessage() for r in caplog.records if "Status:" in r.getMessage())
    assert line.startswith("Status: 0 agents online, 0 events (0/s), 0 alerts, ")
    assert line.endswith("0 rows waiting for the database.")
