"""The sigma plugin in a real hive: alerts through the bus, and over MQTT."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from sigma_helpers import BAD, RULES, ev

from immune import config as config_mod
from immune.config import Config
from immune.events import Alert, encode, now_ns
from immune.hive import Hive
from immune.mqtt import parse_url
from immune.plugins.sigma import SigmaPlugin

S = 1_000_000_000


def make_config(tmp_path: Path, rule_dirs: list[str], **more: Any) -> Config:
    config = config_mod.load(environ={})
    config.hive.database = f"sqlite:///{tmp_path}/hive.db"
    config.plugins["sigma"] = {"rule_dirs": rule_dirs, **more}
    return config


async def run_events(tmp_path: Path, events: list[Any]) -> tuple[Hive, list[Alert]]:
    hive = Hive(
        make_config(tmp_path, [str(RULES)]),
        plugins=[("sigma", SigmaPlugin())],
        discover=False,
    )
    alerts: list[Alert] = []
    async with hive:
        hive.bus.subscribe("alert.#", alerts.append)
        await hive.ingest(events)
        await hive.bus.join()
        await hive.store.flush()
    return hive, alerts


async def test_sigma_plugin_raises_alerts_through_the_bus(tmp_path: Path) -> None:
    java = ev(exe="/usr/lib/jvm/bin/java", pid=50, ppid=1)
    shell = ev(exe="/usr/bin/bash", argv=["bash", "-i"], pid=51, ppid=50)
    benign = ev(exe="/usr/bin/ls", argv=["ls"], pid=52, ppid=1)
    hive, alerts = await run_events(tmp_path, [java, shell, benign])
    try:
        (alert,) = alerts
        assert alert.rule == "0b6f7a52-1c3e-4d7a-9f21-6a1d2c3b4e02"
        assert alert.title == "IMMUNE test - shell started by a Java process"
        assert alert.severity == "critical" and alert.topic == "alert.critical"
        assert alert.plugin == "sigma"
        assert alert.techniques == ["T1059.004", "T1190"]
        assert alert.event_ids == [shell.id]
        assert alert.agent_id == "web-1"
        assert alert.data["exe"] == "/usr/bin/bash"
        assert alert.data["cmdline"] == "bash -i"
        assert alert.data["sigma_file"].endswith("shell_from_java.yml")
        stored = hive.store.alerts()
        assert [a["rule"] for a in stored] == [alert.rule]
        assert hive.metrics.get("sigma.matches") == 1
        assert hive.metrics.get("sigma.rules.refused") == 0
        assert hive.metrics.gauges["sigma.rules.loaded"] == 7
        assert hive.metrics.gauges["sigma.correlations.loaded"] == 3
    finally:
        hive.store.close()


async def test_sigma_plugin_raises_correlation_alerts(tmp_path: Path) -> None:
    t0 = now_ns()
    events = [
        ev("connect", ts=t0 + i * S, addr="203.0.113.7", port=4444) for i in range(5)
    ]
    hive, alerts = await run_events(tmp_path, events)
    try:
        # The base rule alerts nothing on its own (generate: false).
        (alert,) = alerts
        assert alert.rule == "0b6f7a52-1c3e-4d7a-9f21-6a1d2c3b4e11"
        assert alert.severity == "high"
        assert alert.event_ids == [e.id for e in events]
        assert alert.data["correlation"] == "event_count"
        assert alert.data["group"] == {"host": "web-1.test"}
        assert alert.techniques == ["T1571"]
    finally:
        hive.store.close()


async def test_sigma_plugin_reports_what_it_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="immune.plugins.sigma")
    hive = Hive(
        make_config(tmp_path, [str(BAD)]),
        plugins=[("sigma", SigmaPlugin())],
        discover=False,
    )
    async with hive:
        refused = hive.metrics.get("sigma.rules.refused")
    hive.store.close()
    assert refused == len(list(BAD.glob("*.yml"))) + 1  # one file holds two
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        "Refused Sigma rule 0b6f7a52-1c3e-4d7a-9f21-6a1d2c3b4e21" in line
        and "field 'Hashes'" in line
        for line in lines
    )


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"rule_dirs": ["/nonexistent/rules"]}, "'/nonexistent/rules' does not exist"),
        ({"rule_dirs": "rules"}, "rule_dirs: Expected `array`"),
        ({"rules": ["x"]}, "unknown field `rules`"),
        ({"max_groups": 0}, "max_groups: Expected `int` >= 1"),
    ],
)
async def test_sigma_plugin_refuses_bad_configuration(
    tmp_path: Path, table: dict[str, Any], message: str
) -> None:
    config = make_config(tmp_path, [])
    config.plugins["sigma"] = table
    hive = Hive(config, plugins=[("sigma", SigmaPlugin())], discover=False)
    async with hive:
        info = hive.plugins.plugins["sigma"]
    hive.store.close()
    assert info.state == "failed"
    assert message in (info.error or "")


@pytest.mark.mqtt
async def test_sigma_plugin_alerts_on_events_from_mqtt(
    tmp_path: Path, mqtt_broker: str, mqtt_prefix: str
) -> None:
    config = make_config(tmp_path, [str(RULES)])
    config.mqtt.url = mqtt_broker
    config.mqtt.topic_prefix = mqtt_prefix
    config.mqtt.persistent_session = False
    config.mqtt.client_id = f"immune-test-{uuid.uuid4().hex[:12]}"
    config.hive.disabled_plugins = ["alert", "exploit"]
    hive = Hive(config)
    await hive.start()
    try:
        network = next(p.obj for p in hive.plugins.list() if p.name == "network")
        await asyncio.wait_for(network.connected.wait(), 10)
        dropped = ev(exe="/tmp/.cache/kworker", argv=["/tmp/.cache/kworker"])
        payload = encode({"v": 1, "agent_id": "web-1", "events": [dropped]})
        address = parse_url(mqtt_broker)
        async with aiomqtt.Client(address.host, address.port) as client:
            await client.publish(f"{mqtt_prefix}/agents/web-1/events", payload, qos=1)
        deadline = asyncio.get_running_loop().time() + 10
        while hive.metrics.get("sigma.matches") < 1:
            assert asyncio.get_running_loop().time() < deadline, "no Sigma match"
            await asyncio.sleep(0.02)
        await hive.bus.join()
        await hive.store.flush()
        alerts = [a for a in hive.store.alerts() if a["plugin"] == "sigma"]
        assert [a["rule"] for a in alerts] == ["0b6f7a52-1c3e-4d7a-9f21-6a1d2c3b4e01"]
        assert alerts[0]["severity"] == "high"
        assert alerts[0]["techniques"] == ["T1204.002"]
    finally:
        await hive.stop()
        hive.store.close()


async def test_sigma_plugin_without_rule_dirs_subscribes_to_nothing(
    tmp_path: Path,
) -> None:
    hive = Hive(
        make_config(tmp_path, []), plugins=[("sigma", SigmaPlugin())], discover=False
    )
    async with hive:
        info = hive.plugins.plugins["sigma"]
        await hive.ingest([ev(exe="/tmp/x")])
        await hive.bus.join()
    hive.store.close()
    assert info.state == "stopped" and info.topics == []
    assert hive.metrics.gauges["sigma.rules.loaded"] == 0
    assert hive.metrics.get("sigma.matches") == 0
