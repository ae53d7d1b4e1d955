"""What the playbook, response and sentinel tests share: a hive, an agent.

The hive is the real one (bus, storage, plugin manager) without MQTT; the
agent is simulated on the bus: it answers each ``command.send`` on
``command.state`` as a transport would, following a script.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from immune import config as config_mod
from immune.events import Alert, Event, new_id, now_ns
from immune.hive import Hive


def make_hive(db_url: str, plugins: list[tuple[str, Any]], **tables: Any) -> Hive:
    """A hive on ``db_url`` with only these plugins, configured by ``tables``."""
    config = config_mod.load(environ={})
    config.hive.database = db_url
    config.storage.flush_interval = 0.01
    for name, table in tables.items():
        config.plugins[name] = table
    return Hive(config, plugins=plugins, discover=False)


def event(agent: str = "web-1", **fields: Any) -> Event:
    base: dict[str, Any] = {"kind": "exec", "pid": 4242, "uid": 1000}
    base.update(fields)
    return Event(id=new_id(), agent_id=agent, host=f"{agent}.test", ts=now_ns(), **base)


def alert(**fields: Any) -> Alert:
    base: dict[str, Any] = {
        "id": new_id(),
        "ts": now_ns(),
        "rule": "test-rule",
        "title": "A test alert",
        "severity": "low",
        "plugin": "test",
        "agent_id": "web-1",
        "host": "web-1.test",
    }
    base.update(fields)
    return Alert(**base)


async def until(check: Callable[[], Any], timeout: float = 10.0) -> None:
    """Wait until check() is true, failing after timeout seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


class SimulatedAgent:
    """Answers commands on the bus as agents behind a transport would.

    Args:
        hive: the hive whose bus it listens to.
        script: action to the states to report, in order; the default is
            acknowledged then succeeded. ``None`` in place of the list means
            never answer (for timeouts).
        delay: seconds between two reports.
    """

    def __init__(
        self,
        hive: Hive,
        script: dict[str, list[str] | None] | None = None,
        delay: float = 0.01,
    ) -> None:
        self.hive = hive
        self.script = script or {}
        self.delay = delay
        self.received: list[dict[str, Any]] = []
        self.states: list[dict[str, Any]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        hive.bus.subscribe("command.send", self.on_command, owner="simulated-agent")

    def on_command(self, command: dict[str, Any]) -> None:
        self.received.append(command)
        task = asyncio.get_running_loop().create_task(self._answer(command))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def actions(self) -> list[tuple[str, str]]:
        return [(c["agent_id"], c["action"]) for c in self.received]

    async def _answer(self, command: dict[str, Any]) -> None:
        states = self.script.get(command["action"], ["acknowledged", "succeeded"])
        for state in states or []:
            await asyncio.sleep(self.delay)
            message = {
                "id": command["id"],
                "agent_id": command["agent_id"],
                "action": command["action"],
                "state": state,
                "result": {"ok": state == "succeeded"},
                "error": "simulated failure" if state == "failed" else None,
            }
            self.states.append(message)
            await self.hive.publish("command.state", message, key=command["agent_id"])
