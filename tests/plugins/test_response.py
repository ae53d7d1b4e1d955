"""response: commands followed to their end, retried, reverted; auto decisions."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from response_kit import SimulatedAgent, alert, make_hive, until

from immune.commands import CommandError, check_args, make_command
from immune.plugins.playbook import PlaybookPlugin
from immune.plugins.response import ResponsePlugin

FAST = {"tick_s": 0.02, "retry_delay_s": 0.05, "grace_s": 0.05}


async def start(
    db_url: str, *, playbook: bool = False, **response: Any
) -> tuple[Any, ResponsePlugin]:
    plugin = ResponsePlugin()
    plugins: list[tuple[str, Any]] = [("response", plugin)]
    tables: dict[str, Any] = {"response": {**FAST, **response}}
    if playbook:
        plugins.insert(0, ("playbook", PlaybookPlugin()))
        tables["playbook"] = {"dry_run": False}
    hive = make_hive(db_url, plugins, **tables)
    await hive.start()
    return hive, plugin


async def stop(hive: Any) -> None:
    await hive.stop()
    hive.store.close()


async def send(hive: Any, agent_id: str, action: str, **args: Any) -> dict[str, Any]:
    command = make_command(agent_id, action, args, origin="test", ttl_s=0.2)
    await hive.publish("command.send", command, key=agent_id)
    return command


def states(hive: Any) -> list[tuple[str, str, int]]:
    rows = sorted(hive.store.response_commands(), key=lambda r: r["created"])
    return [(r["action"], r["state"], r["attempts"]) for r in rows]


def test_command_arguments_are_validated() -> None:
    assert check_args("kill", {"pid": "42"}) == {"pid": 42}
    assert check_args("block", {"addr": "10.0.0.1"}) == {"addr": "10.0.0.1"}
    assert check_args("block", {"addr": "10.0.0.0/8"}) == {"addr": "10.0.0.0/8"}
    assert check_args("block", {"addr": "::ffff:0:1"}) == {"addr": "::ffff:0:1"}
    for action, args, why in [
        ("kill", {"pid": True}, "integer"),
        ("kill", {"pid": 0}, "range"),
        ("kill", {}, "needs a 'pid'"),
        ("quarantine", {"path": "etc/passwd"}, "absolute"),
        ("quarantine", {"path": "/tmp/../etc/passwd"}, "'..'"),
        ("quarantine", {"path": "/tmp/x\x00y"}, "NUL"),
        ("block", {"addr": "evil.example; rm"}, "not an IP"),
        ("block", {"addr": "1.2.3.4", "port": 70000}, "port"),
        ("isolate", {"duration_s": -1}, "positive"),
        ("isolate", {"opts": {"a": 1}}, "JSON scalar"),
        ("format-disk", {}, "unknown action"),
    ]:
        with pytest.raises(CommandError, match=why):
            check_args(action, args)


async def test_response_follows_a_command_to_success(db_url: str) -> None:
    hive, _plugin = await start(db_url)
    agent = SimulatedAgent(hive)
    try:
        command = await send(hive, "web-1", "kill", pid=42)
        await until(lambda: states(hive) == [("kill", "succeeded", 1)])
        (row,) = hive.store.response_commands()
        assert row["id"] == command["id"] and row["result"] == {"ok": True}
        assert [s["state"] for s in agent.states] == ["acknowledged", "succeeded"]
        assert hive.metrics.get("response.commands.acknowledged") == 1
    finally:
        await stop(hive)


async def test_response_retries_a_failed_command_then_gives_up(
    sqlite_url: str,
) -> None:
    hive, _plugin = await start(sqlite_url, retries=2)
    agent = SimulatedAgent(hive, {"kill": ["acknowledged", "failed"]})
    try:
        first = await send(hive, "web-1", "kill", pid=42)
        await until(lambda: hive.metrics.get("response.gave_up") == 1)
        assert len(agent.received) == 3
        assert all(c["args"] == {"pid": 42} for c in agent.received)
        await until(lambda: [s for _a, s, _n in states(hive)] == ["failed"] * 3)
        rows = hive.store.response_commands()
        assert sorted(r["attempts"] for r in rows) == [1, 2, 3]
        assert {r["first_id"] for r in rows} == {first["id"]}
        assert {r["error"] for r in rows} == {"simulated failure"}
    finally:
        await stop(hive)


async def test_response_retry_succeeds_the_second_time(sqlite_url: str) -> None:
    hive, _plugin = await start(sqlite_url)
    agent = SimulatedAgent(hive, {"kill": ["failed"]})
    try:
        await send(hive, "web-1", "kill", pid=42)
        await until(lambda: len(agent.received) == 1)
        agent.script = {}  # the agent works again
        await until(
            lambda: [s for _a, s, _n in states(hive)] == ["failed", "succeeded"]
        )
        assert hive.metrics.get("response.retries") == 1
    finally:
        await stop(hive)


async def test_response_times_out_a_silent_agent_and_retries(sqlite_url: str) -> None:
    hive, _plugin = await start(sqlite_url, retries=1)
    agent = SimulatedAgent(hive, {"isolate": None})
    try:
        await send(hive, "web-1", "isolate")
        await until(lambda: hive.metrics.get("response.gave_up") == 1)
        assert len(agent.received) == 2
        await until(lambda: [s for _a, s, _n in states(hive)] == ["timed_out"] * 2)
    finally:
        await stop(hive)


async def test_response_late_report_after_timeout_changes_nothing(
    sqlite_url: str,
) -> None:
    hive, plugin = await start(sqlite_url, retries=0)
    agent = SimulatedAgent(hive, {"kill": None})
    try:
        command = await send(hive, "web-1", "kill", pid=3)
        await until(lambda: states(hive) == [("kill", "timed_out", 1)])
        late = {"id": command["id"], "agent_id": "web-1", "action": "kill"}
        await hive.publish("command.state", {**late, "state": "succeeded"})
        await hive.bus.join()
        await asyncio.sleep(0.1)
        assert states(hive) == [("kill", "timed_out", 1)]
        assert hive.metrics.get("response.unknown_states") == 1
        assert agent.received and not plugin.tracked
    finally:
        await stop(hive)


async def test_response_reverts_isolation_after_its_time(sqlite_url: str) -> None:
    hive, _plugin = await start(sqlite_url)
    agent = SimulatedAgent(hive)
    try:
        isolate = await send(hive, "web-1", "isolate", duration_s=0.3)
        await until(lambda: ("web-1", "unisolate") in agent.actions())
        await until(
            lambda: len(states(hive)) == 2 and states(hive)[1][1] == "succeeded"
        )
        rows = sorted(hive.store.response_commands(), key=lambda r: r["created"])
        assert rows[0]["revert_at"] is not None
        assert (
            rows[1]["action"] == "unisolate" and rows[1]["revert_of"] == isolate["id"]
        )
        assert hive.metrics.get("response.reverts") == 1
    finally:
        await stop(hive)


async def test_response_renewed_block_is_reverted_once_later(sqlite_url: str) -> None:
    hive, plugin = await start(sqlite_url)
    agent = SimulatedAgent(hive)
    try:
        loop = asyncio.get_running_loop()
        began = loop.time()
        await send(hive, "web-1", "block", addr="10.1.1.1", duration_s=0.4)
        await asyncio.sleep(0.25)
        await send(hive, "web-1", "block", addr="10.1.1.1", duration_s=0.4)
        await until(lambda: ("web-1", "unblock") in agent.actions())
        # The second block renewed the first: one unblock, after the second.
        assert loop.time() - began >= 0.6
        await asyncio.sleep(0.2)
        unblocks = [c for c in agent.received if c["action"] == "unblock"]
        assert [c["args"] for c in unblocks] == [{"addr": "10.1.1.1"}]
        assert not plugin.holding
    finally:
        await stop(hive)


@pytest.mark.parametrize(
    ("severity", "data", "expected"),
    [
        ("critical", {}, [("web-1", "isolate")]),
        ("high", {"addr": "192.0.2.9"}, [("web-1", "block")]),
        ("medium", {}, []),
        ("low", {}, []),
    ],
)
async def test_response_maps_severity_when_no_playbook_decides(
    sqlite_url: str, severity: str, data: dict[str, Any], expected: list[Any]
) -> None:
    hive, _plugin = await start(sqlite_url, mode="on")
    agent = SimulatedAgent(hive)
    notes: list[Any] = []
    hive.bus.subscribe("notify.*", notes.append)
    try:
        raised = alert(severity=severity, data=data)
        await hive.publish(raised.topic, raised)
        await hive.bus.join()
        await asyncio.sleep(0.1)
        assert agent.actions() == expected
        assert len(notes) == (1 if severity == "medium" else 0)
        if expected:
            await until(lambda: hive.store.runs())
            assert hive.store.runs()[0]["playbook"] == f"auto:{severity}"
    finally:
        await stop(hive)


async def test_response_auto_mapping_is_dry_run_by_default(sqlite_url: str) -> None:
    hive, plugin = await start(sqlite_url)
    agent = SimulatedAgent(hive)
    try:
        assert plugin.mode == "dry_run"
        crit = alert(severity="critical")
        await hive.publish(crit.topic, crit)
        await until(lambda: hive.store.runs() and hive.store.runs()[0]["commands"])
        (run,) = hive.store.runs()
        assert run["dry_run"] is True
        assert [(c["action"], c["state"]) for c in run["commands"]] == [
            ("isolate", "dry_run")
        ]
        assert agent.received == []
    finally:
        await stop(hive)


async def test_response_leaves_alerts_to_playbooks_that_decide(
    sqlite_url: str,
) -> None:
    hive, _plugin = await start(sqlite_url, playbook=True, mode="on")
    agent = SimulatedAgent(hive)
    try:
        # The critical playbook waits 5 s; the automatic isolate would not.
        crit = alert(severity="critical")
        await hive.publish(crit.topic, crit)
        await hive.bus.join()
        await asyncio.sleep(0.2)
        assert agent.received == []
        # A high alert no playbook takes is mapped to a block.
        high = alert(severity="high", data={"addr": "192.0.2.1"})
        await hive.publish(high.topic, high)
        await until(lambda: agent.actions() == [("web-1", "block")])
    finally:
        await stop(hive)


async def test_response_acts_on_verdicts(sqlite_url: str) -> None:
    hive, _plugin = await start(sqlite_url, mode="on")
    agent = SimulatedAgent(hive)
    try:
        verdict = {"alert": alert(), "action": "isolate", "risk": 0.95}
        await hive.publish("verdict.isolate", verdict)
        await until(lambda: agent.actions() == [("web-1", "isolate")])
        await hive.publish("verdict.isolate", {"action": "isolate"})
        await until(lambda: hive.metrics.get("response.bad_verdicts") == 1)
    finally:
        await stop(hive)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("not a dict", "must be a dict"),
        ({"id": "x", "state": "exploded"}, "is not one of"),
        ({"state": "succeeded"}, "'id' string"),
    ],
)
async def test_response_bad_state_message_is_kept_and_counted(
    sqlite_url: str, message: Any, reason: str
) -> None:
    hive, _plugin = await start(sqlite_url)
    try:
        await hive.publish("command.state", message)
        await until(lambda: hive.metrics.get("response.bad_states") == 1)
        await hive.store.flush()
        (dead,) = hive.store.dead_letters()
        assert dead["source"] == "bus:command.state" and reason in dead["reason"]
    finally:
        await stop(hive)


class RecordingTransport(SimulatedAgent):
    """A transport that keeps each command as a row of ``commands``, as the
    network plugin does, and reports its progress."""

    def on_command(self, command: dict[str, Any]) -> None:
        self.received.append(command)
        task = asyncio.get_running_loop().create_task(self._deliver(command))
        self._tasks.add(task)

    async def _deliver(self, command: dict[str, Any]) -> None:
        store = self.hive.store
        await store.add_command(
            command["agent_id"],
            command["action"],
            command["args"],
            command_id=command["id"],
            expires_ns=command["expires_ns"],
        )
        await store.update_command(command["id"], "sent")
        await self._answer(command)
        await store.update_command(command["id"], "succeeded", {"ok": True})


async def test_response_playbook_commands_are_rows_in_storage(
    db_url: str, tmp_path: Path
) -> None:
    books = tmp_path / "books.yaml"
    books.write_text(
        "playbooks:\n  - id: contain\n    trigger: {rules: [chain-*]}\n"
        "    actions:\n      - {action: kill}\n      - {action: isolate}\n",
        encoding="utf-8",
    )
    hive = make_hive(
        db_url,
        [("playbook", PlaybookPlugin()), ("response", ResponsePlugin())],
        playbook={"dry_run": False, "defaults": False, "paths": [str(books)]},
        response=FAST,
    )
    await hive.start()
    transport = RecordingTransport(hive)
    try:
        chain = alert(rule="chain-reverse-shell", severity="critical", data={"pid": 7})
        await hive.publish(chain.topic, chain)
        await until(lambda: len(hive.store.commands()) == 2)
        await until(
            lambda: {c["state"] for c in hive.store.commands()} == {"succeeded"}
        )
        rows = {c["id"]: c for c in hive.store.commands()}
        assert {c["id"] for c in transport.received} == set(rows)
        assert sorted(c["action"] for c in rows.values()) == ["isolate", "kill"]
        await until(
            lambda: (
                {c["state"] for r in hive.store.runs() for c in r["commands"]}
                == {"succeeded"}
            )
        )
        (run,) = hive.store.runs()
        assert {c["id"] for c in run["commands"]} == set(rows)
        assert run["alert_id"] == chain.id
    finally:
        await stop(hive)


async def test_response_verdict_escalates_and_never_repeats(sqlite_url: str) -> None:
    hive, plugin = await start(sqlite_url, mode="on")
    agent = SimulatedAgent(hive)
    try:
        reported = alert(severity="low", data={"addr": "192.0.2.7"})
        plan = {"alert": reported, "playbooks": ["p"], "actions": ["alert", "block"]}
        await hive.publish("playbook.decided", plan)
        await hive.publish("verdict.block", {"alert": reported, "action": "block"})
        await until(lambda: hive.metrics.get("response.verdicts_redundant") == 1)
        assert agent.received == []
        await hive.publish("verdict.isolate", {"alert": reported, "action": "isolate"})
        await until(lambda: agent.actions() == [("web-1", "isolate")])
        # The severity map already isolated this one: a fallback says the same.
        crit = alert(severity="critical")
        await hive.publish(crit.topic, crit)
        await until(lambda: len(agent.received) == 2)
        await hive.publish("verdict.isolate", {"alert": crit, "action": "isolate"})
        await until(lambda: hive.metrics.get("response.verdicts_redundant") == 2)
        await asyncio.sleep(0.1)
        assert len(agent.received) == 2
        assert plugin.planned[crit.id] == {"isolate"}
    finally:
        await stop(hive)


async def test_response_bad_command_is_kept_and_counted(sqlite_url: str) -> None:
    hive, _plugin = await start(sqlite_url)
    try:
        await hive.publish("command.send", {"id": 5, "action": "kill"})
        await until(lambda: hive.metrics.get("response.bad_commands") == 1)
        await hive.store.flush()
        (dead,) = hive.store.dead_letters()
        assert dead["source"] == "bus:command.send"
    finally:
        await stop(hive)


@pytest.mark.parametrize(
    ("config", "why"),
    [
        ({"mood": "calm"}, "unknown settings"),
        ({"mode": "yes"}, "mode must be"),
        ({"map": {"critical": "nuke"}}, "decisions"),
        ({"map": {"dire": "isolate"}}, "severities"),
        ({"retries": -1}, "retries"),
        ({"revert_after_s": {"kill": 5}}, "revert_after_s"),
    ],
)
def test_response_bad_configuration_is_refused(
    sqlite_url: str, config: dict[str, Any], why: str
) -> None:
    hive = make_hive(sqlite_url, [])
    with pytest.raises(ValueError, match=why):
        ResponsePlugin().immune_configure(hive, config)


def test_playbook_unknown_setting_is_refused(sqlite_url: str) -> None:
    hive = make_hive(sqlite_url, [])
    with pytest.raises(ValueError, match="unknown settings"):
        PlaybookPlugin().immune_configure(hive, {"dryrun": False})


async def test_response_note_after_its_command_is_one_row_with_the_run(
    sqlite_url: str,
) -> None:
    # command.send and playbook.command are two topics: the note of a run
    # may come second; the command is recorded once, with its run.
    hive, plugin = await start(sqlite_url)
    try:
        command = make_command("web-1", "isolate", {}, origin="playbook")
        await hive.publish("command.send", command, key="web-1")
        await hive.bus.join()
        note = {"run_id": "run-1", "dry_run": False, "command": command}
        await hive.publish("playbook.command", note, key="web-1")
        await hive.bus.join()
        await until(lambda: plugin._writes.empty())  # noqa: SLF001
        await until(lambda: hive.store.response_commands()[0]["run_id"] == "run-1")
        assert len(hive.store.response_commands()) == 1
        assert hive.metrics.get("response.write_errors") == 0
    finally:
        await stop(hive)
