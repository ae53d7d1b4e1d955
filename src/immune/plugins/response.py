"""response: follows commands to their end, reverts them, decides by default.

Every command published on ``command.send`` (by a playbook, a verdict or this
plugin) is followed through the ``command.state`` reports of the transport:
acknowledged, then succeeded, failed, refused or timed out. A failed or
timed-out command is sent again, up to ``retries`` times; one the agent never
answers is called timed out ``grace_s`` after it expired. A stateful action
that succeeded (isolate, block, freeze) is undone when its time is up
(``duration_s`` of the command, else ``revert_after_s``), unless the same
action on the same target succeeded again meanwhile, which renews it.

When no playbook takes an alert (``playbook.undecided``, or every alert when
the playbook plugin is not running), and for each ``verdict.<action>`` of
``sentinel``, response decides by itself, from the severity map. An operator
turning on an EDR does not expect hosts to be cut off before the rules have
been tuned, so this runs in dry-run by default: the decision and its commands
are recorded, nothing is sent.

Configuration (``[plugins.response]``)::

    mode = "dry_run"        # automatic decisions: "off", "dry_run" or "on"
    map = {critical = "isolate", high = "block", medium = "alert"}
    retries = 2             # sends after the first, for failed or timed out
    retry_delay_s = 2.0
    grace_s = 5.0           # past a command's expiry before it is timed out
    revert_after_s = {isolate = 3600, block = 3600, freeze = 600}
    tick_s = 1.0            # how often timeouts and reverts are checked
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from immune.commands import (
    FINAL_STATES,
    REVERTS,
    SEND,
    STATE,
    STATES,
    CommandError,
    make_command,
)
from immune.events import SEVERITIES, Alert, new_id, now_ns
from immune.hookspecs import hookimpl
from immune.playbooks import affected_agents
from immune.safe import printable

if TYPE_CHECKING:
    from immune.hive import Hive

logger = logging.getLogger(__name__)

MODES = ("off", "dry_run", "on")
DECISIONS = ("isolate", "block", "kill", "alert", "log")
DEFAULT_MAP = {"critical": "isolate", "high": "block", "medium": "alert"}
DEFAULT_REVERT_S = {"isolate": 3600.0, "block": 3600.0, "freeze": 600.0}
_SETTINGS = {"mode", "map", "retries", "retry_delay_s", "grace_s"}
_SETTINGS |= {"revert_after_s", "tick_s"}
_VERDICT_ACTIONS = {"isolate", "block", "alert", "log", "allow"}
MAX_PLANNED = 10_000
Write = Callable[[], Awaitable[Any]]


@dataclass
class Tracked:
    """A command being followed (one attempt)."""

    id: str
    agent_id: str
    action: str
    args: dict[str, Any]
    origin: str
    alert_id: str | None
    expires_ns: int
    run_id: str | None = None
    first_id: str = ""
    attempts: int = 1
    revert_of: str | None = None
    state: str = "sent"
    revert_at: int | None = None
    created: int = field(default_factory=now_ns)

    @property
    def target(self) -> tuple[str, str, str]:
        """What a stateful action holds: renewing means the same target."""
        return (self.agent_id, self.action, str(self.args.get("addr", "")))


class ResponsePlugin:
    """Follows, retries and reverts commands; decides when no playbook did."""

    name = "response"

    def __init__(self) -> None:
        self.hive: Hive
        self.mode = "dry_run"
        self.map: dict[str, str] = dict(DEFAULT_MAP)
        self.retries = 2
        self.retry_delay_s = 2.0
        self.grace_s = 5.0
        self.revert_after_s = dict(DEFAULT_REVERT_S)
        self.tick_s = 1.0
        self.tracked: dict[str, Tracked] = {}
        #: Stateful actions in force: target -> the command holding it.
        self.holding: dict[tuple[str, str, str], Tracked] = {}
        self._writes: asyncio.Queue[Write] = asyncio.Queue()
        #: What was already decided for recent alerts, so that a verdict
        #: escalates and never repeats (alert id -> actions).
        self.planned: OrderedDict[str, set[str]] = OrderedDict()
        self._playbook_running = False

    @hookimpl
    def immune_describe(self) -> dict[str, str]:
        return {"description": f"command follow-up; automatic decisions {self.mode}"}

    @hookimpl
    def immune_configure(self, hive: Hive, config: dict[str, Any]) -> None:
        self.hive = hive
        unknown = set(config) - _SETTINGS
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}; known: {_SETTINGS}")
        self.mode = config.get("mode", "dry_run")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        self.map = _severity_map(config.get("map", DEFAULT_MAP))
        self.retries = _number(config, "retries", 2, int)
        self.retry_delay_s = _number(config, "retry_delay_s", 2.0, float)
        self.grace_s = _number(config, "grace_s", 5.0, float)
        self.tick_s = _number(config, "tick_s", 1.0, float)
        reverts = config.get("revert_after_s", {})
        if not isinstance(reverts, dict) or set(reverts) - set(REVERTS):
            raise ValueError(f"revert_after_s keys must be among {sorted(REVERTS)}")
        self.revert_after_s = {**DEFAULT_REVERT_S, **reverts}
        self._playbook_running = any(
            info.name == "playbook" for info in hive.plugins.active()
        )

    @hookimpl
    def immune_subscriptions(self) -> list[tuple[str, Any]]:
        subs: list[tuple[str, Any]] = [
            ("playbook.command", self.on_note),
            (SEND, self.on_send),
            (STATE, self.on_state),
            ("verdict.*", self.on_verdict),
        ]
        undecided = "playbook.undecided" if self._playbook_running else "alert.#"
        subs.append((undecided, self.on_undecided))
        subs.append(("playbook.decided", self.on_decided))
        return subs

    @hookimpl
    def immune_start(self, hive: Hive) -> None:
        hive.create_task(self._clock(), name="immune-response-clock")
        hive.create_task(self._writer(), name="immune-response-writer")

    @hookimpl
    async def immune_stop(self) -> None:
        # The bus is drained: write what its last messages left behind.
        while not self._writes.empty():
            await self._write_one(self._writes.get_nowait())

    # -- storage, off the bus ----------------------------------------------

    def _queue(self, write: Write) -> None:
        self._writes.put_nowait(write)

    async def _writer(self) -> None:
        stopping = self.hive.stopping
        while not (stopping.is_set() and self._writes.empty()):
            try:
                write = await asyncio.wait_for(self._writes.get(), 0.2)
            except TimeoutError:
                continue
            await self._write_one(write)

    async def _write_one(self, write: Write) -> None:
        try:
            await write()
        except Exception:  # noqa: BLE001 - one bad row must not stop the writer
            self.hive.metrics.inc("response.write_errors")
            logger.exception("Recording a response command failed.")

    # -- following commands ------------------------------------------------

    async def on_note(self, note: dict[str, Any]) -> None:
        """A playbook run's command: record it with its run.

        The note and the command itself cross the bus on two topics, whose
        order is not fixed: a command already followed from
        ``command.send`` gets its run, and is not recorded twice.
        """
        command, run_id = note["command"], note["run_id"]
        held = self.tracked.get(command["id"])
        if held is None:
            self._track(command, run_id=run_id, dry_run=note["dry_run"])
            return
        held.run_id = run_id
        store = self.hive.store
        self._queue(lambda: store.update_response_command(held.id, run_id=run_id))

    async def on_send(self, message: Any) -> None:
        """Any command on its way to an agent: follow it."""
        if not _is_command(message):
            self.hive.metrics.inc("response.bad_commands")
            await self.hive.dead_letter(
                "bus:command.send", "not a command.send message", raw=message
            )
            return
        if message["id"] not in self.tracked:
            self._track(message)

    def _track(
        self,
        command: dict[str, Any],
        *,
        run_id: str | None = None,
        dry_run: bool = False,
        first: Tracked | None = None,
        revert_of: str | None = None,
    ) -> Tracked:
        item = Tracked(
            id=command["id"],
            agent_id=command["agent_id"],
            action=command["action"],
            args=dict(command.get("args") or {}),
            origin=str(command.get("origin", "")),
            alert_id=command.get("alert_id"),
            expires_ns=int(command.get("expires_ns") or now_ns()),
            run_id=run_id if first is None else first.run_id,
            first_id=command["id"] if first is None else first.first_id,
            attempts=1 if first is None else first.attempts + 1,
            revert_of=revert_of if first is None else first.revert_of,
            state="dry_run" if dry_run else "sent",
        )
        if not dry_run:
            self.tracked[item.id] = item
        self.hive.metrics.inc(f"response.commands.{item.state}")
        self._queue(lambda: self._insert(item))
        return item

    async def _insert(self, item: Tracked) -> None:
        await self.hive.store.add_response_command(
            id=item.id,
            run_id=item.run_id,
            alert_id=item.alert_id,
            origin=item.origin,
            agent_id=item.agent_id,
            action=item.action,
            args=item.args,
            state=item.state,
            attempts=item.attempts,
            first_id=item.first_id,
            revert_of=item.revert_of,
            created=item.created,
            updated=item.created,
        )

    async def on_state(self, message: Any) -> None:
        """The transport's report on a command."""
        reason = _bad_state(message)
        if reason:
            self.hive.metrics.inc("response.bad_states")
            await self.hive.dead_letter("bus:command.state", reason, raw=message)
            return
        item = self.tracked.get(message["id"])
        if item is None:
            self.hive.metrics.inc("response.unknown_states")
            return
        error = message.get("error")
        self._set_state(item, message["state"], message.get("result"), error)

    def _set_state(
        self, item: Tracked, state: str, result: Any = None, error: Any = None
    ) -> None:
        if item.state in FINAL_STATES:
            return  # a late report after a timeout changes nothing
        item.state = state
        self.hive.metrics.inc(f"response.commands.{state}")
        values: dict[str, Any] = {"state": state, "updated": now_ns()}
        if isinstance(result, dict):
            values["result"] = result
        if error is not None:
            values["error"] = printable(error, 1024)
        if state == "succeeded":
            values["revert_at"] = self._hold(item)
        self._queue(lambda: self.hive.store.update_response_command(item.id, **values))
        if state in FINAL_STATES:
            self.tracked.pop(item.id, None)
        if state in ("failed", "timed_out"):
            self._retry_later(item)

    def _hold(self, item: Tracked) -> int | None:
        """Start (or renew) the hold of a stateful action; when it ends."""
        if item.action not in REVERTS:
            return None
        seconds = item.args.get("duration_s", self.revert_after_s.get(item.action))
        if not seconds:
            return None
        item.revert_at = now_ns() + int(float(seconds) * 1e9)
        self.holding[item.target] = item  # a newer success renews the hold
        return item.revert_at

    def _retry_later(self, item: Tracked) -> None:
        if item.attempts > self.retries:
            self.hive.metrics.inc("response.gave_up")
            logger.warning(
                "Command %s (%s on %s) %s after %d attempts; giving up.",
                item.first_id,
                item.action,
                item.agent_id,
                item.state,
                item.attempts,
            )
            return
        name = f"immune-response-retry-{item.id}"
        self.hive.create_task(self._retry(item), name=name)

    async def _retry(self, item: Tracked) -> None:
        if not await self.hive.sleep(self.retry_delay_s):
            return  # the hive is stopping: no new commands
        ttl = max(1.0, (item.expires_ns - item.created) / 1e9)
        command = {
            "id": new_id(),
            "agent_id": item.agent_id,
            "action": item.action,
            "args": item.args,
            "expires_ns": now_ns() + int(ttl * 1e9),
            "origin": item.origin,
            "alert_id": item.alert_id,
        }
        self._track(command, first=item)
        self.hive.metrics.inc("response.retries")
        await self.hive.publish(SEND, command, key=item.agent_id)

    # -- the clock: timeouts and reverts -----------------------------------

    async def _clock(self) -> None:
        while await self.hive.sleep(self.tick_s):
            try:
                await self.tick(now_ns())
            except Exception:  # noqa: BLE001 - timeouts must keep being checked
                self.hive.metrics.inc("response.errors")
                logger.exception("Checking timeouts and reverts failed.")

    async def tick(self, now: int) -> None:
        """Time out silent commands and undo holds whose time is up."""
        grace = int(self.grace_s * 1e9)
        for item in list(self.tracked.values()):
            if now > item.expires_ns + grace:
                self._set_state(item, "timed_out", error="no answer from the agent")
        for target, item in list(self.holding.items()):
            if item.revert_at is not None and now >= item.revert_at:
                del self.holding[target]
                await self._revert(item)

    async def _revert(self, item: Tracked) -> None:
        # thaw needs the pid of the freeze; unblock the address or port.
        args = {k: v for k, v in item.args.items() if k in ("addr", "port", "pid")}
        command = make_command(
            item.agent_id,
            REVERTS[item.action],
            args,
            origin="response",
            alert_id=item.alert_id,
        )
        self._track(command, revert_of=item.id, run_id=item.run_id)
        self.hive.metrics.inc("response.reverts")
        logger.info("Undoing %s on %s: its time is up.", item.action, item.agent_id)
        await self.hive.publish(SEND, command, key=item.agent_id)

    # -- deciding when no playbook did -------------------------------------

    async def on_undecided(self, message: Any) -> None:
        """An alert no playbook took: act on the severity map."""
        alert = message["alert"] if isinstance(message, dict) else message
        decision = self.map.get(alert.severity, "log")
        await self.decide(decision, alert, source=f"auto:{alert.severity}")

    def on_decided(self, message: dict[str, Any]) -> None:
        """Note what the playbooks will do about an alert."""
        self._plan(message["alert"].id, message.get("actions", []))

    def _plan(self, alert_id: str, actions: list[str]) -> None:
        self.planned.setdefault(alert_id, set()).update(actions)
        self.planned.move_to_end(alert_id)
        while len(self.planned) > MAX_PLANNED:
            self.planned.popitem(last=False)

    async def on_verdict(self, verdict: Any) -> None:
        """A verdict of ``sentinel``: act on it unless that is already done."""
        alert = verdict.get("alert") if isinstance(verdict, dict) else None
        action = verdict.get("action") if isinstance(verdict, dict) else None
        if not isinstance(alert, Alert) or action not in _VERDICT_ACTIONS:
            self.hive.metrics.inc("response.bad_verdicts")
            await self.hive.dead_letter("bus:verdict", "not a verdict", raw=verdict)
            return
        if action in self.planned.get(alert.id, ()):
            # A playbook or the severity map already does it (a fallback
            # verdict says what the severity map says): do not do it twice.
            self.hive.metrics.inc("response.verdicts_redundant")
            return
        await self.decide(action, alert, source=f"verdict:{action}")

    async def decide(self, decision: str, alert: Alert, *, source: str) -> None:
        """Carry out a decision on an alert (as a recorded run), per ``mode``."""
        self.hive.metrics.inc(f"response.decisions.{decision}")
        self._plan(alert.id, [decision])
        if self.mode == "off" or decision in ("log", "allow"):
            logger.info("Alert %s (%s): %s; no action.", alert.id, alert.rule, source)
            return
        run_id, dry_run = new_id(), self.mode == "dry_run"
        steps: list[dict[str, Any]] = []
        if decision == "alert":
            await self._notify(alert, source, dry_run)
            steps.append({"action": "alert", "state": "done"})
        else:
            steps.append(await self._command(decision, alert, run_id, dry_run))
        now = now_ns()
        values = {
            "id": run_id,
            "playbook": source,
            "alert_id": alert.id,
            "rule": alert.rule,
            "agents": affected_agents(alert),
            "dry_run": dry_run,
            "state": "done",
            "started": now,
            "finished": now,
            "steps": steps,
        }
        self._queue(lambda: self.hive.store.add_run(**values))

    async def _notify(self, alert: Alert, source: str, dry_run: bool) -> None:
        message = {
            "playbook": source,
            "alert_id": alert.id,
            "severity": alert.severity,
            "message": alert.title,
            "title": alert.title,
            "agents": affected_agents(alert),
            "dry_run": dry_run,
        }
        await self.hive.publish(f"notify.{alert.severity}", message)

    async def _command(
        self, action: str, alert: Alert, run_id: str, dry_run: bool
    ) -> dict[str, Any]:
        step: dict[str, Any] = {"action": action}
        args = {k: alert.data[k] for k in _ARGS.get(action, ()) if k in alert.data}
        try:
            if alert.agent_id is None:
                raise CommandError("the alert names no agent")
            command = make_command(
                alert.agent_id, action, args, origin="response", alert_id=alert.id
            )
        except CommandError as exc:
            self.hive.metrics.inc("response.command_errors")
            return {**step, "state": "failed", "errors": [printable(str(exc))]}
        self._track(command, run_id=run_id, dry_run=dry_run)
        if not dry_run:
            await self.hive.publish(SEND, command, key=alert.agent_id)
        return {**step, "state": "done", "commands": [command["id"]]}


_ARGS = {"block": ("addr", "port"), "kill": ("pid",)}


def _is_command(message: Any) -> bool:
    return (
        isinstance(message, dict)
        and isinstance(message.get("id"), str)
        and isinstance(message.get("agent_id"), str)
        and isinstance(message.get("action"), str)
        and isinstance(message.get("args", {}), dict)
    )


def _bad_state(message: Any) -> str | None:
    """Why a ``command.state`` message is unusable, or None."""
    if not isinstance(message, dict) or not isinstance(message.get("id"), str):
        return "a command.state message must be a dict with an 'id' string"
    if message.get("state") not in STATES:
        return f"state {message.get('state')!r} is not one of {sorted(STATES)}"
    return None


def _severity_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError("map must be a table of severity = decision")
    for severity, decision in value.items():
        if severity not in SEVERITIES or decision not in DECISIONS:
            msg = (
                f"map: {severity!r} = {decision!r}; severities are "
                f"{', '.join(SEVERITIES)}, decisions {', '.join(DECISIONS)}"
            )
            raise ValueError(msg)
    return dict(value)


def _number(config: dict[str, Any], key: str, default: float, kind: type) -> Any:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{key} must be a number of at least 0, got {value!r}")
    return kind(value)
