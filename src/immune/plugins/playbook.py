"""playbook: runs YAML playbooks on alerts (see docs/response.md).

Each alert is matched against the playbooks, highest priority first; every
playbook whose trigger matches runs (a ``final`` one stops the search). A run
is an asyncio task of its own, so a ``wait`` step pauses that run and never
the bus. Steps that touch an agent become commands on ``command.send``; the
``response`` plugin follows them. When no playbook takes an alert, it is
handed on as ``playbook.undecided`` for response's automatic mapping.

Configuration (``[plugins.playbook]``)::

    dry_run = true         # record what would be done, send nothing
    defaults = true        # load the playbooks shipped with IMMUNE
    paths = []             # more playbook files or directories
    max_runs = 100         # runs in progress at once; more are refused
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from immune.commands import SEND, CommandError, make_command
from immune.events import Alert, new_id, now_ns
from immune.hookspecs import hookimpl
from immune.playbooks import (
    Playbook,
    PlaybookError,
    Step,
    affected_agents,
    default_playbooks,
    load_file,
    playbook_files,
)
from immune.safe import printable

if TYPE_CHECKING:
    from immune.hive import Hive

logger = logging.getLogger(__name__)

#: Where a run tells response which of its commands belong to it.
COMMAND_NOTE = "playbook.command"
_SETTINGS = {"dry_run", "defaults", "paths", "max_runs"}
#: Alert data keys a command argument may be taken from.
_ARG_KEYS = {"kill": ("pid",), "quarantine": ("path",), "block": ("addr", "port")}


class PlaybookPlugin:
    """Matches alerts to playbooks and runs them."""

    name = "playbook"

    def __init__(self) -> None:
        self.hive: Hive
        self.playbooks: list[Playbook] = []
        self.errors: list[PlaybookError] = []
        self.dry_run = True
        self.max_runs = 100
        self.runs: set[asyncio.Task[None]] = set()
        self._started: dict[str, deque[float]] = {}

    @hookimpl
    def immune_describe(self) -> dict[str, str]:
        mode = "dry-run" if self.dry_run else "live"
        return {"description": f"{len(self.playbooks)} playbooks ({mode})"}

    @hookimpl
    def immune_configure(self, hive: Hive, config: dict[str, Any]) -> None:
        self.hive = hive
        unknown = set(config) - _SETTINGS
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}; known: {_SETTINGS}")
        self.dry_run = bool(config.get("dry_run", True))
        self.max_runs = int(config.get("max_runs", 100))
        books = default_playbooks() if config.get("defaults", True) else []
        for path in config.get("paths", []):
            books += self._load(path)
        self.set_playbooks(books)

    def _load(self, path: str) -> list[Playbook]:
        # A bad file is refused alone; the other playbooks keep working.
        books: list[Playbook] = []
        for file in playbook_files(path):
            try:
                books += load_file(file)
            except PlaybookError as exc:
                self.errors.append(exc)
                self.hive.metrics.inc("playbook.bad_files")
                logger.error("Playbook file refused: %s.", exc)
        return books

    def set_playbooks(self, books: list[Playbook]) -> None:
        """Use these playbooks, highest priority first (a later id replaces)."""
        by_id = {book.id: book for book in books}
        self.playbooks = sorted(by_id.values(), key=lambda b: -b.priority)

    @hookimpl
    def immune_subscriptions(self) -> list[tuple[str, Any]]:
        return [("alert.#", self.on_alert)]

    @hookimpl
    async def immune_stop(self) -> None:
        for task in list(self.runs):
            task.cancel()
        await asyncio.gather(*self.runs, return_exceptions=True)

    # -- matching ----------------------------------------------------------

    async def on_alert(self, alert: Alert) -> None:
        """Start every playbook the alert triggers, or hand it on."""
        matched, started, plans = [], [], set()
        for book in self.playbooks:
            if not book.enabled or not book.trigger.matches(alert):
                continue
            matched.append(book.id)
            plans |= {_plan(step) for step in book.steps if step.action != "wait"}
            if self._allowed(book):
                started.append(book.id)
                self._start(book, alert)
            if book.final:
                break
        # A playbook held back by its rate limit still took the alert: it
        # must not fall through to response's automatic decisions.
        topic = "playbook.decided" if matched else "playbook.undecided"
        message = {"alert": alert, "playbooks": started, "actions": sorted(plans)}
        await self.hive.publish(topic, message)

    def _allowed(self, book: Playbook) -> bool:
        now = time.monotonic()
        recent = self._started.setdefault(book.id, deque())
        while recent and now - recent[0] > book.rate_per_s:
            recent.popleft()
        if len(self.runs) >= self.max_runs:
            self.hive.metrics.inc("playbook.too_many_runs")
            msg = "Playbook %s not run: %d runs in progress (max_runs)."
            self._refuse(book, msg, self.max_runs)
            return False
        if len(recent) >= book.rate_runs:
            self.hive.metrics.inc(f"playbook.rate_limited.{book.id}")
            msg = "Playbook %s not run: its rate limit of %d runs is reached."
            self._refuse(book, msg, book.rate_runs)
            return False
        recent.append(now)
        return True

    def _refuse(self, book: Playbook, msg: str, limit: int) -> None:
        # The hive's once-a-second log: an alert storm must not flood it.
        self.hive._warn_rarely(f"playbook:{book.id}", msg, book.id, limit)  # noqa: SLF001

    def _start(self, book: Playbook, alert: Alert) -> None:
        run = Run(self, book, alert)
        task = self.hive.create_task(run.execute(), name=f"playbook-{book.id}")
        self.runs.add(task)
        task.add_done_callback(self.runs.discard)
        self.hive.metrics.inc("playbook.runs")


class Run:
    """One playbook run on one alert: its steps in order, recorded."""

    def __init__(self, plugin: PlaybookPlugin, book: Playbook, alert: Alert) -> None:
        self.plugin, self.hive = plugin, plugin.hive
        self.book, self.alert = book, alert
        self.id = new_id()
        self.dry_run = plugin.dry_run or book.dry_run
        self.agents = affected_agents(alert)
        self.steps: list[dict[str, Any]] = []

    async def execute(self) -> None:
        """Take each step; record the run at its start and its end."""
        store = self.hive.store
        await store.add_run(
            id=self.id,
            playbook=self.book.id,
            alert_id=self.alert.id,
            rule=self.alert.rule,
            agents=self.agents,
            dry_run=self.dry_run,
            state="running",
            started=now_ns(),
            steps=[],
        )
        state = "done"
        try:
            for step in self.book.steps:
                if not await self._step(step):
                    state = "cancelled"
                    break
        except asyncio.CancelledError:
            state = "cancelled"
            raise
        finally:
            await asyncio.shield(
                store.update_run(
                    self.id, state=state, finished=now_ns(), steps=self.steps
                )
            )
        logger.info("Playbook %s on alert %s: %s.", self.book.id, self.alert.id, state)

    async def _step(self, step: Step) -> bool:
        """Take one step; False when the hive is stopping during a wait."""
        record: dict[str, Any] = {"action": step.action, "line": step.line}
        self.steps.append(record)
        if step.action == "wait":
            record["state"] = "done"
            return self.dry_run or await self.hive.sleep(float(step.params["seconds"]))
        if step.agent_action is None:
            await self._notify(step)
            record["state"] = "done"
            return True
        record["commands"], errors = await self._commands(step)
        record["state"] = "failed" if errors and not record["commands"] else "done"
        if errors:
            record["errors"] = errors
        return True

    async def _notify(self, step: Step) -> None:
        message = {
            "playbook": self.book.id,
            "run_id": self.id,
            "alert_id": self.alert.id,
            "severity": step.params.get("severity", self.alert.severity),
            "message": step.params.get("message", self.alert.title),
            "title": self.alert.title,
            "agents": self.agents,
            "dry_run": self.dry_run,
        }
        await self.hive.publish(f"notify.{message['severity']}", message)

    async def _commands(self, step: Step) -> tuple[list[str], list[str]]:
        """Publish the step's commands; their ids and what could not be sent."""
        targets = self.agents if step.params.get("targets") == "all" else []
        if not targets and self.alert.agent_id:
            targets = [self.alert.agent_id]
        if not targets:
            return [], ["the alert names no agent"]
        ids, errors = [], []
        for agent_id in targets:
            try:
                command = self._command(step, agent_id)
            except CommandError as exc:
                self.hive.metrics.inc("playbook.command_errors")
                errors.append(printable(str(exc)))
                continue
            ids.append(command["id"])
            await self._publish(command)
        return ids, errors

    async def _publish(self, command: dict[str, Any]) -> None:
        # Response records the command with its run first, then (unless this
        # is a dry run) the transport gets it; one key keeps them in order.
        key = command["agent_id"]
        note = {"run_id": self.id, "dry_run": self.dry_run, "command": command}
        await self.hive.publish(COMMAND_NOTE, note, key=key)
        if not self.dry_run:
            await self.hive.publish(SEND, command, key=key)

    def _command(self, step: Step, agent_id: str) -> dict[str, Any]:
        action = step.agent_action
        assert action is not None
        args: dict[str, Any] = {}
        for key in _ARG_KEYS.get(action, ()):
            value = step.params.get(key, self.alert.data.get(key))
            if value is not None:
                args[key] = value
        if "duration_s" in step.params:
            args["duration_s"] = step.params["duration_s"]
        if action == "collect":
            args["alert_id"] = self.alert.id
        return make_command(
            agent_id,
            action,
            args,
            origin="playbook",
            alert_id=self.alert.id,
            ttl_s=float(step.params.get("ttl_s", 60.0)),
        )


def _plan(step: Step) -> str:
    """What a step will do, in the words of verdicts (alert, isolate...)."""
    return step.agent_action or "alert"
