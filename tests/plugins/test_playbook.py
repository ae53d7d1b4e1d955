"""Playbooks: the format, its errors, triggers, and runs on the real hive."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest
from response_kit import SimulatedAgent, alert, make_hive, until

from immune.playbooks import (
    PlaybookError,
    Trigger,
    affected_agents,
    default_playbooks,
    load_text,
)
from immune.plugins.playbook import PlaybookPlugin
from immune.plugins.response import ResponsePlugin

GOOD = """\
playbooks:
  - id: quick
    priority: 5
    trigger: {min_severity: high}
    actions:
      - action: alert
      - action: kill
"""


def test_playbook_defaults_are_the_reference_ones() -> None:
    books = {b.id: b for b in default_playbooks()}
    steps = {i: [s.action for s in b.steps] for i, b in books.items()}
    assert steps == {
        "lateral-movement-isolate": ["alert", "isolate"],
        "reverse-shell-contain": ["block", "alert", "snapshot"],
        "exfiltration-block": ["block", "alert"],
        "critical-isolate": ["alert", "wait", "isolate"],
        "credential-access-alert": ["alert"],
    }
    assert books["critical-isolate"].steps[1].params["seconds"] == 5
    assert books["lateral-movement-isolate"].trigger.min_agents == 3
    # It isolates every agent itself: critical-isolate must not repeat it.
    assert books["lateral-movement-isolate"].final
    assert books["lateral-movement-isolate"].steps[1].params["targets"] == "all"


BAD = [
    ("playbooks:\n  - id: x\n   bad: [1\n", 3, "not valid YAML"),
    ("just: text\n", 1, "'playbooks' list"),
    ("playbooks:\n  - id: x\n    actions:\n      - action: explode\n", 4, "explode"),
    ("playbooks:\n  - id: x\n    colour: red\n    actions: []\n", 3, "colour"),
    ("playbooks:\n  - id: x\n    actions: []\n", 3, "'actions' must be"),
    ("playbooks:\n  - id: x\n    actions:\n      - action: wait\n", 4, "seconds"),
    (
        "playbooks:\n  - id: x\n    actions:\n      - action: wait\n"
        "        seconds: -1\n",
        5,
        "seconds",
    ),
    (
        "playbooks:\n  - id: x\n    trigger:\n      min_severity: dire\n"
        "    actions:\n      - action: alert\n",
        4,
        "min_severity",
    ),
    (
        "playbooks:\n  - id: x\n    trigger:\n      hours: noon\n"
        "    actions:\n      - action: alert\n",
        4,
        "HH:MM",
    ),
    (
        "playbooks:\n  - id: x\n    priority: high\n"
        "    actions:\n      - action: alert\n",
        3,
        "priority must be int",
    ),
    (
        "playbooks:\n  - id: x\n    actions:\n      - action: isolate\n"
        "        targets: everyone\n",
        5,
        "targets",
    ),
    (
        "playbooks:\n  - id: x\n    rate_limit: {runs: 0}\n"
        "    actions:\n      - action: alert\n",
        3,
        "rate_limit",
    ),
    ("playbooks:\n  - {actions: [{action: alert}]}\n", 2, "needs an 'id'"),
]


@pytest.mark.parametrize(("text", "line", "reason"), BAD)
def test_playbook_bad_file_is_refused_with_file_line_and_reason(
    text: str, line: int, reason: str
) -> None:
    with pytest.raises(PlaybookError) as caught:
        load_text(text, "lab/bad.yaml")
    assert caught.value.source == "lab/bad.yaml"
    assert caught.value.line == line
    assert reason in caught.value.reason
    assert str(caught.value).startswith(f"lab/bad.yaml:{line}: ")


def test_playbook_repeated_id_is_refused() -> None:
    text = GOOD + "  - id: quick\n    actions:\n      - action: alert\n"
    with pytest.raises(PlaybookError, match="repeated"):
        load_text(text, "x.yaml")


def test_playbook_trigger_conditions() -> None:
    crit = alert(severity="critical", rule="exploit-x", techniques=["T1059.004"])
    assert Trigger(min_severity="high").matches(crit)
    assert not Trigger(min_severity="critical").matches(alert(severity="high"))
    assert Trigger(rules=("exploit-*",)).matches(crit)
    assert not Trigger(rules=("sigma-*",)).matches(crit)
    assert Trigger(tags=("T1059*",)).matches(crit)
    assert Trigger(tags=("lab",)).matches(alert(data={"tags": ["lab"]}))
    assert not Trigger(tags=("T1003*",)).matches(crit)
    assert Trigger(plugins=("test",)).matches(crit)
    assert not Trigger(plugins=("exploit",)).matches(crit)
    many = alert(data={"agents": ["web-1", "web-2", "db-1", "bad id!"]})
    assert affected_agents(many) == ["web-1", "web-2", "db-1"]
    assert Trigger(min_agents=3).matches(many)
    assert not Trigger(min_agents=3).matches(crit)


def test_playbook_trigger_hours_across_midnight() -> None:
    night = Trigger(hours=(22 * 60, 6 * 60))
    at = [dt.datetime(2026, 1, 1, h, 30, tzinfo=dt.UTC) for h in (23, 3, 12)]
    assert [night.matches(alert(), now) for now in at] == [True, True, False]
    day = Trigger(hours=(9 * 60, 17 * 60))
    assert [day.matches(alert(), now) for now in at] == [False, False, True]


def test_playbook_bad_file_among_good_ones_keeps_the_good(tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text(GOOD, encoding="utf-8")
    (tmp_path / "bad.yaml").write_text("playbooks: [{id: y}]\n", encoding="utf-8")
    hive = make_hive(f"sqlite:///{tmp_path / 'x.db'}", [])
    plugin = PlaybookPlugin()
    plugin.immune_configure(hive, {"paths": [str(tmp_path)], "defaults": False})
    assert [b.id for b in plugin.playbooks] == ["quick"]
    assert [e.source for e in plugin.errors] == [str(tmp_path / "bad.yaml")]
    assert hive.metrics.get("playbook.bad_files") == 1


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "books.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


async def start(
    tmp_path: Path, db_url: str, books: str | None, **playbook: Any
) -> tuple[Any, SimulatedAgent]:
    table: dict[str, Any] = {"dry_run": False, **playbook}
    if books is not None:
        table.update(defaults=False, paths=[write(tmp_path, books)])
    hive = make_hive(
        db_url,
        [("playbook", PlaybookPlugin()), ("response", ResponsePlugin())],
        playbook=table,
        response={"mode": "off", "tick_s": 0.05},
    )
    await hive.start()
    return hive, SimulatedAgent(hive)


async def stop(hive: Any) -> None:
    await hive.stop()
    hive.store.close()


async def test_playbook_wait_does_not_block_the_bus(
    tmp_path: Path, sqlite_url: str
) -> None:
    books = """\
playbooks:
  - id: slow
    trigger: {rules: [slow]}
    actions:
      - {action: wait, seconds: 0.5}
      - {action: isolate}
  - id: fast
    trigger: {rules: [fast]}
    actions:
      - {action: kill}
"""
    hive, agent = await start(tmp_path, sqlite_url, books)
    try:
        began = time.monotonic()
        await hive.raise_alert(
            rule="slow", title="s", severity="high", plugin="t", events=[]
        )
        slow = alert(rule="slow")
        await hive.publish(slow.topic, slow)
        fast = alert(rule="fast", data={"pid": 77})
        await hive.publish(fast.topic, fast)
        await until(lambda: ("web-1", "kill") in agent.actions())
        # The kill went out while the slow run was still waiting.
        assert time.monotonic() - began < 0.5
        assert ("web-1", "isolate") not in agent.actions()
        await until(lambda: ("web-1", "isolate") in agent.actions())
        assert time.monotonic() - began >= 0.5
        kill = next(c for c in agent.received if c["action"] == "kill")
        assert kill["args"] == {"pid": 77}
        assert kill["origin"] == "playbook" and kill["alert_id"] == fast.id
        assert set(kill) == {
            "id",
            "agent_id",
            "action",
            "args",
            "expires_ns",
            "origin",
            "alert_id",
        }
    finally:
        await stop(hive)


async def test_playbook_critical_default_alerts_then_isolates_after_5_s(
    tmp_path: Path, sqlite_url: str
) -> None:
    hive, agent = await start(tmp_path, sqlite_url, None)
    notes: list[tuple[float, dict[str, Any]]] = []
    hive.bus.subscribe("notify.*", lambda m: notes.append((time.monotonic(), m)))
    try:
        crit = alert(severity="critical", rule="exploit-x")
        began = time.monotonic()
        await hive.publish(crit.topic, crit)
        await until(lambda: notes)
        assert notes[0][1]["playbook"] == "critical-isolate"
        assert notes[0][0] - began < 1
        await until(lambda: ("web-1", "isolate") in agent.actions(), timeout=10)
        assert time.monotonic() - began >= 5
        assert agent.received[0]["args"] == {"duration_s": 3600}
        await until(lambda: hive.store.runs() and hive.store.runs()[0]["finished"])
        run = hive.store.runs()[0]
        assert run["playbook"] == "critical-isolate" and run["state"] == "done"
        assert [s["action"] for s in run["steps"]] == ["alert", "wait", "isolate"]
    finally:
        await stop(hive)


async def test_playbook_lateral_movement_isolates_every_agent(
    tmp_path: Path, db_url: str
) -> None:
    hive, agent = await start(tmp_path, db_url, None)
    try:
        agents = ["web-1", "web-2", "db-1"]
        lateral = alert(
            rule="lateral-movement", severity="high", data={"agents": agents}
        )
        await hive.publish(lateral.topic, lateral)
        await until(lambda: len(agent.received) == 3)
        assert sorted(agent.actions()) == sorted((a, "isolate") for a in agents)
        await until(
            lambda: (
                [c["state"] for r in hive.store.runs() for c in r["commands"]]
                == ["succeeded"] * 3
            )
        )
        (run,) = hive.store.runs()
        assert run["playbook"] == "lateral-movement-isolate"
        assert sorted(run["agents"]) == sorted(agents)
        assert {c["agent_id"] for c in run["commands"]} == set(agents)
    finally:
        await stop(hive)


async def test_playbook_two_agents_are_not_lateral_movement(
    tmp_path: Path, sqlite_url: str
) -> None:
    hive, agent = await start(tmp_path, sqlite_url, None)
    try:
        two = alert(rule="lateral-movement", data={"agents": ["web-1", "web-2"]})
        await hive.publish(two.topic, two)
        await hive.bus.join()
        await asyncio.sleep(0.1)
        assert agent.received == []
        assert hive.metrics.get("playbook.runs") == 0
    finally:
        await stop(hive)


async def test_playbook_reverse_shell_blocks_alerts_and_snapshots(
    tmp_path: Path, sqlite_url: str
) -> None:
    hive, agent = await start(tmp_path, sqlite_url, None)
    try:
        shell = alert(
            rule="reverse-shell-cmdline", severity="high", data={"addr": "10.9.8.7"}
        )
        await hive.publish(shell.topic, shell)
        await until(lambda: len(agent.received) == 2)
        assert [c["action"] for c in agent.received] == ["block", "collect"]
        assert agent.received[0]["args"] == {"addr": "10.9.8.7", "duration_s": 3600}
        assert agent.received[1]["args"] == {"alert_id": shell.id}
    finally:
        await stop(hive)


async def test_playbook_dry_run_records_commands_and_sends_none(
    tmp_path: Path, sqlite_url: str
) -> None:
    hive, agent = await start(tmp_path, sqlite_url, GOOD, dry_run=True)
    try:
        high = alert(severity="high", data={"pid": 99})
        await hive.publish(high.topic, high)
        await until(lambda: hive.store.runs() and hive.store.runs()[0]["commands"])
        (run,) = hive.store.runs()
        assert run["dry_run"] is True
        (command,) = run["commands"]
        assert (command["action"], command["args"], command["state"]) == (
            "kill",
            {"pid": 99},
            "dry_run",
        )
        assert agent.received == []
    finally:
        await stop(hive)


async def test_playbook_rate_limit(tmp_path: Path, sqlite_url: str) -> None:
    books = GOOD.replace(
        "priority: 5", "priority: 5\n    rate_limit: {runs: 2, per_s: 60}"
    )
    hive, agent = await start(tmp_path, sqlite_url, books)
    undecided: list[Any] = []
    hive.bus.subscribe("playbook.undecided", undecided.append)
    try:
        for pid in range(1, 6):
            high = alert(severity="high", data={"pid": pid})
            await hive.publish(high.topic, high)
        await until(lambda: len(agent.received) == 2)
        await asyncio.sleep(0.1)
        # Runs are tasks of their own: the two admitted may finish in any order.
        assert sorted(c["args"]["pid"] for c in agent.received) == [1, 2]
        assert hive.metrics.get("playbook.rate_limited.quick") == 3
        assert undecided == []  # held back, not handed to automatic decisions
    finally:
        await stop(hive)


async def test_playbook_priority_and_final(tmp_path: Path, sqlite_url: str) -> None:
    books = """\
playbooks:
  - id: low
    priority: 1
    trigger: {}
    actions: [{action: collect}]
  - id: high
    priority: 9
    final: true
    trigger: {rules: [stop-here]}
    actions: [{action: isolate}]
  - id: middle
    priority: 5
    trigger: {}
    actions: [{action: kill, pid: 5}]
"""
    hive, agent = await start(tmp_path, sqlite_url, books)
    try:
        first = alert(rule="stop-here")
        await hive.publish(first.topic, first)
        await until(lambda: agent.received)
        await asyncio.sleep(0.1)
        assert agent.actions() == [("web-1", "isolate")]
        other = alert(rule="other")
        await hive.publish(other.topic, other)
        await until(lambda: len(agent.received) == 3)
        assert sorted(a for _, a in agent.actions()[1:]) == ["collect", "kill"]
    finally:
        await stop(hive)


async def test_playbook_invalid_argument_is_refused_and_recorded(
    tmp_path: Path, sqlite_url: str
) -> None:
    hive, agent = await start(tmp_path, sqlite_url, GOOD)
    try:
        bad = alert(severity="high", data={"pid": "1; rm -rf /"})
        await hive.publish(bad.topic, bad)
        await until(lambda: hive.store.runs() and hive.store.runs()[0]["finished"])
        (run,) = hive.store.runs()
        kill = run["steps"][1]
        assert kill["state"] == "failed"
        assert "pid must be an integer" in kill["errors"][0]
        assert agent.received == []
        assert hive.metrics.get("playbook.command_errors") == 1
    finally:
        await stop(hive)


async def test_playbook_stop_during_a_wait_cancels_the_run(
    tmp_path: Path, sqlite_url: str
) -> None:
    books = (
        "playbooks:\n  - id: w\n    actions:\n      - {action: wait, seconds: 600}\n"
    )
    hive, _agent = await start(tmp_path, sqlite_url, books)
    crit = alert()
    await hive.publish(crit.topic, crit)
    await until(lambda: hive.store.runs())
    began = time.monotonic()
    await hive.stop()
    assert time.monotonic() - began < 5
    (run,) = hive.store.runs()
    assert run["state"] == "cancelled"
    hive.store.close()


async def test_playbook_undecided_alert_is_handed_on(
    tmp_path: Path, sqlite_url: str
) -> None:
    hive, _agent = await start(tmp_path, sqlite_url, GOOD)
    seen: list[tuple[str, Any]] = []
    hive.bus.subscribe("playbook.*", lambda m: seen.append(m))
    try:
        low = alert(severity="low")
        await hive.publish(low.topic, low)
        await until(lambda: seen)
        assert seen[0]["playbooks"] == [] and seen[0]["alert"].id == low.id
    finally:
        await stop(hive)


async def test_playbook_max_runs_in_progress(tmp_path: Path, sqlite_url: str) -> None:
    books = "playbooks:\n  - id: w\n    actions:\n      - {action: wait, seconds: 60}\n"
    hive, _agent = await start(tmp_path, sqlite_url, books, max_runs=1)
    try:
        for _ in range(3):
            one = alert()
            await hive.publish(one.topic, one)
        await until(lambda: hive.metrics.get("playbook.too_many_runs") == 2)
        assert hive.metrics.get("playbook.runs") == 1
    finally:
        await stop(hive)
