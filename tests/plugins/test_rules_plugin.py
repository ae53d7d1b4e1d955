"""The rules and correlate plugins in a hive: reloads, refusals, settings."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from immune import config as config_mod
from immune.events import Alert, Event, now_ns
from immune.hive import Hive
from immune.manager import PluginManager
from immune.plugins.correlate import CorrelatePlugin
from immune.plugins.rules import RulesPlugin

_ids = itertools.count()


def event(exe: str, kind: str = "exec", agent_id: str = "a", **fields: Any) -> Event:
    return Event(
        id=f"rp-{next(_ids)}",
        agent_id=agent_id,
        host="h",
        ts=now_ns(),
        kind=kind,
        exe=exe,
        **fields,
    )


RULE = """\
rules:
  - id: {id}
    severity: {severity}
    condition: {{kind: exec, exe: {exe}}}
"""


def make_hive(
    tmp_path: Path, rules: dict[str, Any], correlate: dict[str, Any] | None = None
) -> Hive:
    config = config_mod.load(environ={})
    config.hive.database = f"sqlite:///{tmp_path / 'hive.db'}"
    config.plugins["rules"] = rules
    config.plugins["correlate"] = correlate or {"poll_interval": 0}
    plugins = [("rules", RulesPlugin()), ("correlate", CorrelatePlugin())]
    return Hive(config, plugins=plugins, discover=False)


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met"
        await asyncio.sleep(0.02)


def write(path: Path, text: str) -> None:
    # Bump the time too: two writes within the file system's mtime
    # granularity would otherwise look unchanged when the size is equal.
    path.write_text(text)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))


async def run_and_collect(hive: Hive, alerts: list[Alert], *events: Event) -> list[str]:
    before = len(alerts)
    await hive.ingest(events)
    for _ in range(3):
        await hive.bus.join()
    return [a.rule for a in alerts[before:]]


async def test_rules_reload_on_file_change_and_keep_running_on_a_bad_file(tmp_path):
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    path = rules_dir / "mine.yaml"
    write(path, RULE.format(id="first", severity="low", exe="/opt/a"))
    settings = {"paths": [str(rules_dir)], "defaults": False, "poll_interval": 0.05}
    hive = make_hive(tmp_path, settings)
    alerts: list[Alert] = []
    hive.bus.subscribe("alert.#", alerts.append, owner="test")
    async with hive:
        plugin = next(p.obj for p in hive.plugins.list() if p.name == "rules")
        assert await run_and_collect(hive, alerts, event("/opt/a")) == ["first"]

        write(path, RULE.format(id="second", severity="high", exe="/opt/b"))
        await until(lambda: "second" in plugin.ruleset.rules)
        assert await run_and_collect(
            hive, alerts, event("/opt/a"), event("/opt/b")
        ) == ["second"]

        write(
            path,
            "rules:\n  - id: third\n    condition: {kind: exec, exe: {regex: '(x'}}\n",
        )
        await until(lambda: hive.metrics.get("rules.refused") == 1)
        assert plugin.source.errors[0].line == 3
        assert "RE2" in plugin.source.errors[0].reason
        # The rules that were running keep running (on another command line:
        # the same one again would fold into the alert it raised before).
        again = event("/opt/b", argv=["/opt/b", "again"])
        assert await run_and_collect(hive, alerts, again) == ["second"]
    assert hive.metrics.get("rules.reloads") >= 3


async def test_rules_reload_on_demand(tmp_path):
    path = tmp_path / "r.yaml"
    write(path, RULE.format(id="one", severity="low", exe="/opt/a"))
    hive = make_hive(
        tmp_path, {"paths": [str(path)], "defaults": False, "poll_interval": 0}
    )
    alerts: list[Alert] = []
    hive.bus.subscribe("alert.#", alerts.append, owner="test")
    async with hive:
        write(path, RULE.format(id="two", severity="low", exe="/opt/a"))
        assert await run_and_collect(hive, alerts, event("/opt/a")) == ["one"]
        await hive.publish("rules.reload", {})
        await hive.bus.join()
        assert await run_and_collect(hive, alerts, event("/opt/a")) == ["two"]


async def test_rules_bad_file_at_start_is_refused_and_others_run(tmp_path):
    (tmp_path / "a.yaml").write_text(
        RULE.format(id="good", severity="low", exe="/opt/a")
    )
    (tmp_path / "b.yaml").write_text("rules: {not: a list}\n")
    hive = make_hive(
        tmp_path, {"paths": [str(tmp_path)], "defaults": False, "poll_interval": 0}
    )
    alerts: list[Alert] = []
    hive.bus.subscribe("alert.#", alerts.append, owner="test")
    async with hive:
        assert hive.plugins.plugins["rules"].state == "running"
        assert hive.metrics.get("rules.refused") == 1
        assert await run_and_collect(hive, alerts, event("/opt/a")) == ["good"]


async def test_rules_disable_setting_silences_a_rule(tmp_path):
    hive = make_hive(tmp_path, {"poll_interval": 0, "disable": ["exec-from-temp-dir"]})
    alerts: list[Alert] = []
    hive.bus.subscribe("alert.#", alerts.append, owner="test")
    async with hive:
        assert await run_and_collect(hive, alerts, event("/tmp/x")) == []
        shadow = event("/usr/bin/cat", "open", path="/etc/shadow")
        assert await run_and_collect(hive, alerts, shadow) == ["credential-file-read"]


async def test_rules_alert_carries_event_context(tmp_path):
    hive = make_hive(tmp_path, {"poll_interval": 0})
    alerts: list[Alert] = []
    hive.bus.subscribe("alert.#", alerts.append, owner="test")
    async with hive:
        ev = Event(
            id="ctx-1",
            agent_id="a",
            host="h",
            ts=now_ns(),
            kind="exec",
            exe="/tmp/x",
            pid=7,
            argv=["/tmp/x", "-q"],
        )
        await run_and_collect(hive, alerts, ev)
    (alert,) = alerts
    assert (alert.rule, alert.plugin, alert.severity) == (
        "exec-from-temp-dir",
        "rules",
        "high",
    )
    assert alert.event_ids == ["ctx-1"]
    assert alert.techniques == ["T1204.002", "T1036.005"]
    assert alert.data["pid"] == 7 and alert.data["cmdline"] == "/tmp/x -q"
    assert alert.data["rule_file"].endswith("10-host.yaml")


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"colour": 1}, "unknown settings"),
        ({"paths": "/etc/rules"}, "paths must be a list"),
        ({"poll_interval": -1}, "poll_interval"),
        ({"defaults": "yes"}, "defaults must be"),
    ],
)
async def test_rules_bad_settings_disable_the_plugin_with_the_reason(
    tmp_path, settings, words
):
    hive = make_hive(tmp_path, settings)
    async with hive:
        info = hive.plugins.plugins["rules"]
        assert info.state == "failed"
        assert words in (info.error or "")


async def test_correlate_bad_max_keys_is_refused(tmp_path):
    hive = make_hive(tmp_path, {"poll_interval": 0}, {"max_keys": 0})
    async with hive:
        assert "max_keys" in (hive.plugins.plugins["correlate"].error or "")


async def test_correlate_reload_keeps_window_state(tmp_path):
    hive = make_hive(tmp_path, {"poll_interval": 0})
    async with hive:
        plugin = next(p.obj for p in hive.plugins.list() if p.name == "correlate")
        for n in range(3):
            ev = Event(
                id=f"k-{n}",
                agent_id="a",
                host="h",
                ts=now_ns(),
                kind="connect",
                addr="198.51.100.3",
                port=9000,
            )
            await hive.ingest([ev])
        await hive.bus.join()
        assert plugin.correlator.keys("exfiltration") == 1
        await hive.publish("rules.reload", {})
        await hive.bus.join()
        assert plugin.correlator.keys("exfiltration") == 1


def test_plugins_are_registered_as_entry_points():
    manager = PluginManager()
    manager.load_all()
    for name in ("rules", "correlate"):
        info = manager.plugins[name]
        assert info.state == "loaded", info.error
        assert "immune.plugins" in info.origin
