"""Issue 6's acceptance, end to end: attacks published as agents publish them
(MQTT, a real broker) into a hive running every installed plugin; one
correlation alert each, and the playbooks' commands recorded and sent.

The hive is the one ``immune hive`` runs (plugins found by their entry
points), with the playbooks live (``dry_run = false``). No agent answers the
commands here: they are followed from ``sent``; what an agent does with them
is tested with the agent's actions.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from immune import config as config_mod
from immune import signing, topics
from immune.events import Alert, Event, encode, new_id, now_ns
from immune.hive import Hive
from immune.mqtt import parse_url

pytestmark = pytest.mark.mqtt

NS = 1_000_000_000


class Scenario:
    """A hive on a real broker, what crossed its bus, what reached agents."""

    def __init__(self, hive: Hive, broker: str, prefix: str) -> None:
        self.hive, self.broker, self.prefix = hive, broker, prefix
        self.alerts: list[Alert] = []
        self.sent: list[dict[str, Any]] = []
        #: Agent id to the raw payloads on its commands topic.
        self.delivered: dict[str, list[bytes]] = {}
        hive.bus.subscribe("alert.#", self.alerts.append, owner="test")
        hive.bus.subscribe("command.send", self.sent.append, owner="test")
        #: Events start this long ago, so that their windows lie in the past.
        self.start = now_ns() - 2000 * NS

    def event(self, kind: str, agent: str, at: float, **fields: Any) -> Event:
        base: dict[str, Any] = {"pid": 4242, "ppid": 1, "uid": 1000}
        base.update(fields)
        ts = self.start + int(at * NS)
        host = f"{agent}.test"
        return Event(id=new_id(), agent_id=agent, host=host, ts=ts, kind=kind, **base)

    async def publish(self, events: list[Event]) -> None:
        """Each agent's events in one batch, on its events topic, in order."""
        address = parse_url(self.broker)
        async with aiomqtt.Client(address.host, address.port) as client:
            for agent in dict.fromkeys(e.agent_id for e in events):
                mine = [e for e in events if e.agent_id == agent]
                payload = encode({"v": 1, "agent_id": agent, "events": mine})
                topic = topics.agent_topic(self.prefix, agent, "events")
                await client.publish(topic, payload, qos=1)
        total = len(events)
        await until(lambda: self.hive.metrics.get("events.accepted") >= total)

    def correlations(self) -> list[Alert]:
        return [a for a in self.alerts if a.plugin == "correlate"]

    def commands_for(self, alert: Alert) -> list[dict[str, Any]]:
        return [c for c in self.sent if c["alert_id"] == alert.id]

    async def settle(self) -> None:
        for _ in range(5):
            await self.hive.bus.join()


async def until(check: Callable[[], Any], timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.05)


async def _listen(scenario: Scenario, ready: asyncio.Event) -> None:
    # The agents' side of the broker: the signed commands as they arrive.
    address = parse_url(scenario.broker)
    async with aiomqtt.Client(address.host, address.port) as client:
        await client.subscribe(topics.agent_filter(scenario.prefix, "commands"), qos=1)
        ready.set()
        async for message in client.messages:
            agent = str(message.topic).split("/")[-2]
            payload = bytes(message.payload)  # type: ignore[arg-type]
            scenario.delivered.setdefault(agent, []).append(payload)


@pytest.fixture
async def scenario(
    tmp_path: Path, mqtt_broker: str, mqtt_prefix: str
) -> AsyncIterator[Scenario]:
    config = config_mod.load(environ={})
    config.hive.database = f"sqlite:///{tmp_path / 'hive.db'}"
    config.storage.flush_interval = 0.01
    config.mqtt.url = mqtt_broker
    config.mqtt.topic_prefix = mqtt_prefix
    config.mqtt.persistent_session = False
    config.mqtt.client_id = f"immune-test-{uuid.uuid4().hex[:12]}"
    config.plugins["alert"] = {"console": False, "file": str(tmp_path / "alerts.log")}
    config.plugins["rules"] = {"poll_interval": 0}
    config.plugins["correlate"] = {"poll_interval": 0}
    config.plugins["playbook"] = {"dry_run": False}
    config.plugins["response"] = {"tick_s": 0.05}
    hive = Hive(config)
    scene = Scenario(hive, mqtt_broker, mqtt_prefix)
    ready = asyncio.Event()
    listener = asyncio.create_task(_listen(scene, ready))
    await asyncio.wait_for(ready.wait(), 10)
    await hive.start()
    running = {p.name for p in hive.plugins.list()}
    assert {"rules", "correlate", "playbook", "response", "network"} <= running
    network = next(p.obj for p in hive.plugins.list() if p.name == "network")
    await asyncio.wait_for(network.connected.wait(), 10)
    try:
        yield scene
    finally:
        await hive.stop()
        hive.store.close()
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await listener


async def recorded(scene: Scenario, alert: Alert, actions: list[str]) -> None:
    """The playbooks' commands for an alert: on the bus, in the playbook runs
    and response's table, in the transport's ``commands`` table, and
    delivered, signed, on the agent's commands topic."""
    store = scene.hive.store

    def sent() -> list[str]:
        return sorted(c["action"] for c in scene.commands_for(alert))

    await until(lambda: sent() == sorted(actions))
    ids = {c["id"] for c in scene.commands_for(alert)}
    await store.flush()

    def in_runs() -> set[str]:
        runs = [r for r in store.runs(limit=None) if r["alert_id"] == alert.id]
        return {c["id"] for r in runs for c in r["commands"]}

    await until(lambda: in_runs() == ids)
    followed = {c["id"] for c in store.response_commands(limit=None)}
    assert ids <= followed
    await until(lambda: ids <= {c["id"] for c in store.commands(limit=None)})
    rows = [c for c in store.commands(limit=None) if c["id"] in ids]
    assert all(row["origin"] == "playbook" for row in rows)

    network = next(p.obj for p in scene.hive.plugins.list() if p.name == "network")
    public = network.desk.key.public_key()

    def delivered() -> dict[str, tuple[str, str]]:
        # Signed by the hive: verify() refuses anything else.
        found = {}
        for agent, payloads in scene.delivered.items():
            for payload in payloads:
                command = signing.verify(public, payload)
                found[command.id] = (agent, command.action)
        return {i: v for i, v in found.items() if i in ids}

    await until(lambda: set(delivered()) == ids)
    assert scene.hive.metrics.get("response.write_errors") == 0
    wanted = {c["id"]: (c["agent_id"], c["action"]) for c in scene.commands_for(alert)}
    assert delivered() == wanted


async def test_acceptance_reverse_shell_chain(scenario: Scenario) -> None:
    s = scenario
    implant = "/tmp/.cache/implant"
    chain = [
        s.event("exec", "web-1", 1, exe=implant, argv=[implant]),
        s.event("connect", "web-1", 2, exe=implant, addr="203.0.113.7", port=4444),
        s.event("setuid", "web-1", 4, exe=implant, euid=0, old_euid=1000),
    ]
    # Near misses: the same steps out of order, and too slow.
    wrong_order = [
        s.event("setuid", "web-2", 1, exe="/tmp/i2", euid=0, old_euid=1000),
        s.event("exec", "web-2", 2, exe="/tmp/i2", argv=["/tmp/i2"]),
        s.event("connect", "web-2", 3, exe="/tmp/i2", addr="198.51.100.2", port=5555),
    ]
    too_slow = [
        s.event("exec", "web-3", 1, exe="/tmp/i3", argv=["/tmp/i3"]),
        s.event("connect", "web-3", 2, exe="/tmp/i3", addr="198.51.100.3", port=6666),
        s.event("setuid", "web-3", 400, exe="/tmp/i3", euid=0, old_euid=1000),
    ]
    await s.publish([*chain, *wrong_order, *too_slow])
    await until(lambda: s.correlations())
    await s.settle()

    (alert,) = s.correlations()
    assert (alert.rule, alert.agent_id) == ("chain-reverse-shell", "web-1")
    assert alert.event_ids == [e.id for e in chain]
    assert (alert.data["addr"], alert.data["port"]) == ("203.0.113.7", 4444)
    # reverse-shell-contain blocks the remote end and snapshots at once;
    # critical-isolate isolates the host 5 s later.
    await recorded(s, alert, ["block", "collect", "isolate"])
    block = next(c for c in s.commands_for(alert) if c["action"] == "block")
    assert block["agent_id"] == "web-1"
    assert block["args"]["addr"] == "203.0.113.7"
    assert {c["agent_id"] for c in s.sent} == {"web-1"}


async def test_acceptance_credential_harvest_chain(scenario: Scenario) -> None:
    s = scenario
    chain = [
        s.event("open", "db-1", 1, path="/etc/shadow", exe="/usr/bin/cat"),
        s.event("open", "db-1", 20, path="/root/.ssh/id_rsa", exe="/usr/bin/cp"),
        s.event(
            "connect", "db-1", 40, exe="/usr/bin/curl", addr="203.0.113.8", port=443
        ),
    ]
    # Near misses (other files: one file read on 3 agents is lateral
    # movement).
    too_slow = [
        s.event("open", "db-2", 1, path="/etc/gshadow", exe="/usr/bin/cat"),
        s.event("open", "db-2", 20, path="/home/b/.ssh/id_rsa", exe="/usr/bin/cp"),
        s.event("connect", "db-2", 700, addr="198.51.100.8", port=443),
    ]
    wrong_order = [
        s.event("connect", "db-3", 1, addr="198.51.100.9", port=443),
        s.event("open", "db-3", 2, path="/home/c/.ssh/id_rsa", exe="/usr/bin/cp"),
        s.event("open", "db-3", 3, path="/etc/sudoers", exe="/usr/bin/cat"),
    ]
    await s.publish([*chain, *too_slow, *wrong_order])
    await until(lambda: s.correlations())
    await s.settle()

    (alert,) = s.correlations()
    assert (alert.rule, alert.agent_id) == ("chain-credential-harvest", "db-1")
    # Each near miss raised its single-event alerts, but no chain.
    singles = {(a.agent_id, a.rule) for a in s.alerts if a.plugin == "rules"}
    assert {("db-2", "credential-file-read"), ("db-3", "ssh-key-read")} <= singles
    assert alert.event_ids == [e.id for e in chain]
    # credential-access-alert tells a person; critical-isolate isolates.
    await recorded(s, alert, ["isolate"])
    runs = {r["playbook"] for r in s.hive.store.runs() if r["alert_id"] == alert.id}
    assert runs == {"credential-access-alert", "critical-isolate"}


async def test_acceptance_exfiltration(scenario: Scenario) -> None:
    s = scenario
    out = [
        s.event("connect", "app-1", 10 * n, addr="198.51.100.20", port=8443)
        for n in range(6)
    ]
    # Five connections spread over 400 s, and many to loopback: no finding.
    slow = [
        s.event("connect", "app-2", 100 * n, addr="198.51.100.21", port=8443)
        for n in range(5)
    ]
    local = [
        s.event("connect", "app-3", n, addr="127.0.0.1", port=5432) for n in range(8)
    ]
    await s.publish([*out, *slow, *local])
    await until(lambda: s.correlations())
    await s.settle()

    (alert,) = s.correlations()
    assert (alert.rule, alert.agent_id) == ("exfiltration", "app-1")
    assert alert.event_ids == [e.id for e in out[:5]]
    await recorded(s, alert, ["block"])
    (block,) = s.commands_for(alert)
    assert block["args"] == {"addr": "198.51.100.20", "port": 8443, "duration_s": 3600}
    assert {c["agent_id"] for c in s.sent} == {"app-1"}


async def test_acceptance_lateral_movement(scenario: Scenario) -> None:
    s = scenario
    c2 = "203.0.113.99"
    spread = [
        s.event("connect", agent, 10 + n, addr=c2, port=31337)
        for n, agent in enumerate(["ws-1", "ws-2", "ws-3"])
    ]
    # Another indicator on two agents only.
    two = [
        s.event("connect", agent, 20, addr="198.51.100.50", port=31337)
        for agent in ["ws-4", "ws-5"]
    ]
    await s.publish([*spread, *two])
    await until(lambda: s.correlations())
    await s.settle()

    (alert,) = s.correlations()
    assert alert.rule == "lateral-movement"
    assert alert.data["key"] == f"indicator={c2}"
    assert sorted(alert.data["agents"]) == ["ws-1", "ws-2", "ws-3"]
    # lateral-movement-isolate isolates all three, and is final: the
    # critical-isolate playbook does not isolate one of them a second time.
    await recorded(s, alert, ["isolate", "isolate", "isolate"])
    targets = sorted(c["agent_id"] for c in s.commands_for(alert))
    assert targets == ["ws-1", "ws-2", "ws-3"]
    runs = [r["playbook"] for r in s.hive.store.runs() if r["alert_id"] == alert.id]
    assert runs == ["lateral-movement-isolate"]
    assert not {"ws-4", "ws-5"} & {c["agent_id"] for c in s.sent}
