"""Tests of immune-portscan: the detection alone, then inside a real hive."""

from __future__ import annotations

import importlib.metadata
import itertools
from typing import Any

import immune.config
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from immune.errors import PluginError
from immune.events import Alert, Event
from immune.hive import Hive

from immune_portscan import NAME, RULE, PortScanPlugin, Settings, Tracker

SECOND = 10**9
T0 = 1_700_000_000 * SECOND
_ids = itertools.count()


def connect(
    port: int,
    *,
    at: float = 0.0,
    addr: str = "192.0.2.10",
    pid: int | None = 4242,
    agent_id: str = "web-1",
    **fields: Any,
) -> Event:
    """A connect event ``at`` seconds after T0; ``fields`` override the rest."""
    values: dict[str, Any] = {
        "comm": "nc",
        "exe": "/usr/bin/nc.openbsd",
        "family": "inet6" if ":" in addr else "inet",
        "sensor": "test",
        **fields,
    }
    return Event(
        id=f"ev-{next(_ids)}",
        agent_id=agent_id,
        host=agent_id,
        ts=T0 + int(at * SECOND),
        kind="connect",
        pid=pid,
        addr=addr,
        port=port,
        **values,
    )


def tracker(**table: Any) -> Tracker:
    return Tracker(Settings.from_table(table))


def feed(track: Tracker, events: list[Event]) -> list[Any]:
    return [f for f in map(track.observe, events) if f is not None]


# -- configuration -------------------------------------------------------------


def test_settings_defaults():
    s = Settings.from_table({})
    assert (s.threshold, s.window, s.severity) == (20, 60.0, "medium")


def test_settings_accepts_an_integer_window():
    assert Settings.from_table({"window": 5}).window == 5.0


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"threshold": 1}, "[plugins.portscan] threshold: Expected `int` >= 2"),
        ({"threshold": "5"}, "threshold: Expected `int`, got `str`"),
        ({"window": 0}, "window: Expected `float` > 0"),
        ({"window": True}, "window: Expected `float`, got `bool`"),
        ({"severity": "huge"}, "severity: Invalid enum value 'huge'"),
        ({"max_tracked": 0}, "max_tracked: Expected `int` >= 1"),
        ({"treshold": 5}, "Object contains unknown field `treshold`"),
        ({"ignore_addrs": ["10.0.0.0/33"]}, "ignore_addrs: '10.0.0.0/33' is not"),
        ({"ignore_addrs": [10]}, "ignore_addrs[0]: Expected `str`, got `int`"),
    ],
)
def test_settings_refuses_bad_values(table, message):
    with pytest.raises(PluginError, match="portscan") as info:
        Settings.from_table(table)
    assert message in str(info.value)
    assert info.value.plugin == NAME


# -- detection -----------------------------------------------------------------


def test_tracker_alerts_when_threshold_reached():
    track = tracker(threshold=5)
    assert feed(track, [connect(p, at=p / 10) for p in range(20, 24)]) == []

    finding = track.observe(connect(24, at=1))

    assert finding is not None
    assert finding.ports == [20, 21, 22, 23, 24]
    assert (finding.agent_id, finding.process, finding.addr) == (
        "web-1",
        "4242",
        "192.0.2.10",
    )
    assert [e.ts for e in finding.events] == sorted(e.ts for e in finding.events)


def test_tracker_counts_a_port_once():
    track = tracker(threshold=3)
    assert feed(track, [connect(443, at=i) for i in range(50)]) == []
    assert feed(track, [connect(80, at=51), connect(22, at=52)]) != []


def test_tracker_forgets_ports_outside_the_window():
    track = tracker(threshold=3, window=10)
    # Three ports, but never three within ten seconds of each other.
    events = [connect(1000 + i, at=i * 6) for i in range(10)]
    assert feed(track, events) == []


def test_tracker_keeps_processes_addresses_and_agents_apart():
    track = tracker(threshold=3)
    events = [
        connect(1, pid=1),
        connect(2, pid=2),
        connect(3, addr="192.0.2.11"),
        connect(4, agent_id="web-2"),
        connect(5, pid=None),  # no pid: known by its executable
        connect(6),
    ]
    assert feed(track, events) == []
    assert len(track) == 6


def test_tracker_is_quiet_for_a_window_after_an_alert():
    track = tracker(threshold=3, window=10)
    scan = [connect(p, at=p / 100) for p in range(1, 31)]  # 30 ports in 0.3 s
    assert len(feed(track, scan)) == 1

    later = [connect(p, at=11 + p / 100) for p in range(100, 103)]
    assert len(feed(track, later)) == 1


def test_tracker_treats_ipv4_mapped_ipv6_as_ipv4():
    track = tracker(threshold=2)
    assert track.observe(connect(1, addr="::ffff:192.0.2.10")) is None
    finding = track.observe(connect(2, addr="192.0.2.10"))
    assert finding is not None and finding.addr == "192.0.2.10"


@pytest.mark.parametrize(
    "event",
    [
        connect(0),
        connect(1, addr="10.1.2.3"),
        connect(1, addr="2001:db8::1"),
        connect(1, exe="/usr/lib/nagios/check_tcp"),
        connect(1, family="unix"),
        Event(id="x", agent_id="a", host="a", ts=T0, kind="connect", addr="1.2.3.4"),
        Event(id="y", agent_id="a", host="a", ts=T0, kind="bind", port=8080),
    ],
    ids=[
        "port-0",
        "ignored-net",
        "ignored-net6",
        "ignored-exe",
        "unix",
        "no-port",
        "bind",
    ],
)
def test_tracker_skips_what_it_should_not_count(event):
    track = tracker(
        threshold=2,
        ignore_addrs=["10.0.0.0/8", "2001:db8::/32"],
        ignore_exes=["/usr/lib/nagios/check_tcp"],
    )
    track.observe(event)
    assert len(track) == 0


def test_tracker_evicts_least_recent_beyond_max_tracked():
    track = tracker(threshold=2, max_tracked=3)
    feed(track, [connect(1, pid=pid) for pid in range(10)])
    assert len(track) == 3
    assert track.evicted == 7
    # The three most recent processes survived: their second port alerts; an
    # evicted one starts again from nothing.
    assert len(feed(track, [connect(2, pid=pid) for pid in (7, 8, 9)])) == 3
    assert track.observe(connect(2, pid=0)) is None


def test_tracker_drops_idle_entries():
    track = tracker(threshold=5, window=10)
    feed(track, [connect(1, pid=pid) for pid in range(100)])
    assert len(track) == 100

    track.observe(connect(1, pid=1, at=11))

    assert len(track) == 1
    assert track.evicted == 0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 30),  # seconds
            st.integers(1, 6),  # pid
            st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8::3"]),
            st.integers(1, 12),  # port
        ),
        max_size=300,
    )
)
def test_tracker_state_stays_bounded(steps):
    track = tracker(threshold=4, window=5, max_tracked=5)
    for at, pid, addr, port in sorted(steps):
        track.observe(connect(port, at=at, pid=pid, addr=addr))
        assert len(track) <= 5
        assert all(len(p.ports) < 4 for p in track._probes.values())


# -- the plugin in a hive ------------------------------------------------------


def test_entry_point_is_registered():
    points = importlib.metadata.entry_points(group="immune.plugins", name=NAME)
    assert [ep.load() for ep in points] == [PortScanPlugin]


def make_hive(tmp_path, table: dict[str, Any]) -> Hive:
    config = immune.config.load(environ={})
    config.hive.database = f"sqlite:///{tmp_path}/t.db"
    config.plugins[NAME] = table
    return Hive(config, plugins=[(NAME, PortScanPlugin())], discover=False)


async def test_hook_immune_subscriptions_raises_alert_in_a_hive(tmp_path):
    hive = make_hive(tmp_path, {"threshold": 5, "severity": "high"})
    alerts: list[Alert] = []
    await hive.start()
    try:
        hive.bus.subscribe("alert.#", alerts.append, owner="test")
        scan = [connect(port, at=port / 100) for port in range(20, 26)]
        await hive.ingest([connect(443, addr="198.51.100.7"), *scan])
        await hive.bus.join()
        await hive.store.flush()
        stored = hive.store.alerts()
    finally:
        await hive.stop()

    assert [row["rule"] for row in stored] == [RULE]

    assert [a.rule for a in alerts] == [RULE]
    alert = alerts[0]
    assert (alert.severity, alert.plugin, alert.agent_id) == ("high", NAME, "web-1")
    assert alert.techniques == ["T1046"]
    assert alert.event_ids == [e.id for e in scan[:5]]
    assert alert.data["ports"] == [20, 21, 22, 23, 24]
    assert alert.data["addr"] == "192.0.2.10"
    assert hive.metrics.get(f"{NAME}.scans") == 1


async def test_hook_immune_configure_refusal_disables_the_plugin(tmp_path):
    hive = make_hive(tmp_path, {"threshold": 1})
    await hive.start()
    try:
        info = hive.plugins.plugins[NAME]
        await hive.ingest([connect(port) for port in range(30)])
        await hive.bus.join()
    finally:
        await hive.stop()

    assert info.state == "failed"
    assert "threshold: Expected `int` >= 2" in (info.error or "")
    assert hive.metrics.get("alerts.raised") == 0


def test_hook_immune_describe():
    described = PortScanPlugin().immune_describe()
    assert described["version"]
    assert "port scan" in described["description"]
