"""Playbooks: what to do when an alert matches, as YAML (see docs/response.md).

A file holds ``playbooks:``, a list of playbooks. Each has a trigger (all of
its conditions must hold) and ordered actions. A file is checked whole when
it is loaded: a mistake is refused with the file, the line and the reason,
and nothing of that file is used.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from immune.errors import ImmuneError
from immune.events import SEVERITIES, SEVERITY_RANK, Alert
from immune.topics import is_valid_agent_id

#: Actions a playbook step may take; the value is the agent action it sends.
STEP_ACTIONS: dict[str, str | None] = {
    "alert": None,
    "notify": None,
    "wait": None,
    "block": "block",
    "isolate": "isolate",
    "kill": "kill",
    "quarantine": "quarantine",
    "snapshot": "collect",
    "collect": "collect",
}
_STEP_KEYS = {"action", "targets", "duration_s", "seconds", "message", "severity"}
_STEP_KEYS |= {"addr", "port", "path", "pid", "ttl_s"}
_TRIGGER_KEYS = {"min_severity", "rules", "tags", "plugins", "min_agents", "hours"}
_PLAYBOOK_KEYS = {"id", "description", "priority", "enabled", "dry_run", "final"}
_PLAYBOOK_KEYS |= {"rate_limit", "trigger", "actions"}
MAX_WAIT_S = 24 * 3600.0


class PlaybookError(ImmuneError):
    """A playbook file is wrong.

    Args:
        source: the file.
        line: the line (1-based) at fault, when known.
        reason: what is wrong and how to put it right.
    """

    def __init__(self, source: str, line: int | None, reason: str) -> None:
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {reason}")
        self.source, self.line, self.reason = source, line, reason


@dataclass(frozen=True)
class Trigger:
    """When a playbook runs; every condition given must hold."""

    min_severity: str = "info"
    rules: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    plugins: tuple[str, ...] = ()
    min_agents: int = 1
    hours: tuple[int, int] | None = None  # minutes of the UTC day, [from, to)

    def matches(self, alert: Alert, now: dt.datetime | None = None) -> bool:
        """True when the alert meets every condition of the trigger."""
        if SEVERITY_RANK[alert.severity] < SEVERITY_RANK[self.min_severity]:
            return False
        if self.rules and not _any_glob(self.rules, [alert.rule]):
            return False
        if self.tags and not _any_glob(self.tags, alert_tags(alert)):
            return False
        if self.plugins and alert.plugin not in self.plugins:
            return False
        if len(affected_agents(alert)) < self.min_agents:
            return False
        return self.hours is None or _in_hours(self.hours, now)


@dataclass(frozen=True)
class Step:
    """One action of a playbook, with its parameters as written."""

    action: str
    params: dict[str, Any]
    line: int

    @property
    def agent_action(self) -> str | None:
        return STEP_ACTIONS[self.action]


@dataclass(frozen=True)
class Playbook:
    """A trigger and the ordered steps to take when it matches."""

    id: str
    trigger: Trigger
    steps: tuple[Step, ...]
    description: str = ""
    priority: int = 0
    enabled: bool = True
    dry_run: bool = False
    final: bool = False
    rate_runs: int = 10
    rate_per_s: float = 60.0
    source: str = ""


def alert_tags(alert: Alert) -> list[str]:
    """The alert's ATT&CK techniques and any ``data["tags"]``."""
    extra = alert.data.get("tags")
    tags = list(alert.techniques)
    if isinstance(extra, list):
        tags += [t for t in extra if isinstance(t, str)]
    return tags


def affected_agents(alert: Alert) -> list[str]:
    """The agents an alert concerns: ``data["agents"]``, else its agent."""
    listed = alert.data.get("agents")
    found: list[str] = []
    if isinstance(listed, list):
        found = [a for a in listed if isinstance(a, str) and is_valid_agent_id(a)]
    if alert.agent_id and alert.agent_id not in found:
        found.insert(0, alert.agent_id)
    return list(dict.fromkeys(found))


def _any_glob(patterns: tuple[str, ...], values: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(v, p) for p in patterns for v in values)


def _in_hours(hours: tuple[int, int], now: dt.datetime | None) -> bool:
    now = now or dt.datetime.now(dt.UTC)
    minute = now.hour * 60 + now.minute
    start, end = hours
    if start <= end:
        return start <= minute < end
    return minute >= start or minute < end  # across midnight


# -- loading ---------------------------------------------------------------


class _Map(dict[str, Any]):
    """A YAML mapping that remembers its line and the line of each key."""

    line: int = 0
    lines: dict[str, int]


class _LineLoader(yaml.SafeLoader):
    """A safe loader whose mappings are :class:`_Map`, with their lines."""


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> _Map:
    pairs = loader.construct_mapping(node, deep=True)
    result = _Map({str(key): value for key, value in pairs.items()})
    result.line = node.start_mark.line + 1
    result.lines = {str(k.value): v.start_mark.line + 1 for k, v in node.value}
    return result


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)


def load_text(text: str, source: str) -> list[Playbook]:
    """Parse and check the playbooks of one file's text.

    Raises:
        PlaybookError: with the source, the line and the reason.
    """
    try:
        doc = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise PlaybookError(source, line, f"not valid YAML: {problem}") from None
    if not isinstance(doc, _Map) or not isinstance(doc.get("playbooks"), list):
        reason = "expected a mapping with a 'playbooks' list at the top"
        raise PlaybookError(source, 1, reason)
    line = doc.lines["playbooks"]
    books = [_playbook(item, source, line) for item in doc["playbooks"]]
    seen: set[str] = set()
    for book in books:
        if book.id in seen:
            raise PlaybookError(source, None, f"playbook id {book.id!r} is repeated")
        seen.add(book.id)
    return books


def load_file(path: str | Path) -> list[Playbook]:
    """Load one playbook file (see :func:`load_text`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PlaybookError(str(path), None, f"cannot read it: {exc}") from None
    return load_text(text, str(path))


def default_playbooks() -> list[Playbook]:
    """The playbooks shipped in the package (``default.yaml``)."""
    ref = resources.files("immune.playbooks").joinpath("default.yaml")
    return load_text(ref.read_text(encoding="utf-8"), "immune/playbooks/default.yaml")


def playbook_files(path: str | Path) -> list[Path]:
    """The ``*.yaml``/``*.yml`` files of a directory, or the file itself."""
    path = Path(path)
    if path.is_dir():
        return sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
    return [path]


def _fail(source: str, node: _Map, key: str | None, reason: str) -> PlaybookError:
    line = node.lines.get(key, node.line) if key else node.line
    return PlaybookError(source, line, reason)


def _playbook(item: Any, source: str, line: int) -> Playbook:
    if not isinstance(item, _Map):
        raise PlaybookError(source, line, "each playbook must be a mapping")
    _no_unknown(item, _PLAYBOOK_KEYS, source, "playbook")
    ident = item.get("id")
    if not isinstance(ident, str) or not is_valid_agent_id(ident):
        raise _fail(source, item, "id", "a playbook needs an 'id' (letters, digits, -)")
    actions = item.get("actions")
    if not isinstance(actions, list) or not actions:
        raise _fail(source, item, "actions", f"{ident}: 'actions' must be a list")
    runs, per_s = _rate(item, source)
    return Playbook(
        id=ident,
        trigger=_trigger(item.get("trigger", _Map()), source, item),
        steps=tuple(_step(s, source, item.lines["actions"]) for s in actions),
        description=str(item.get("description", "")),
        priority=_typed(item, "priority", int, 0, source),
        enabled=_typed(item, "enabled", bool, True, source),
        dry_run=_typed(item, "dry_run", bool, False, source),
        final=_typed(item, "final", bool, False, source),
        rate_runs=runs,
        rate_per_s=per_s,
        source=f"{source}:{item.line}",
    )


def _rate(item: _Map, source: str) -> tuple[int, float]:
    rate = item.get("rate_limit", _Map({"runs": 10, "per_s": 60}))
    if not isinstance(rate, dict):
        raise _fail(source, item, "rate_limit", "rate_limit must be {runs, per_s}")
    runs, per_s = rate.get("runs", 10), rate.get("per_s", 60)
    if not isinstance(runs, int) or runs < 1 or not _positive(per_s):
        reason = "rate_limit needs runs (an integer >= 1) and per_s (seconds > 0)"
        raise _fail(source, item, "rate_limit", reason)
    return runs, float(per_s)


def _trigger(node: Any, source: str, parent: _Map) -> Trigger:
    if not isinstance(node, _Map):
        raise _fail(source, parent, "trigger", "'trigger' must be a mapping")
    _no_unknown(node, _TRIGGER_KEYS, source, "trigger")
    severity = node.get("min_severity", "info")
    if severity not in SEVERITY_RANK:
        reason = f"min_severity must be one of {', '.join(SEVERITIES)}"
        raise _fail(source, node, "min_severity", reason)
    min_agents = _typed(node, "min_agents", int, 1, source)
    if min_agents < 1:
        raise _fail(source, node, "min_agents", "min_agents must be at least 1")
    return Trigger(
        min_severity=severity,
        rules=_strings(node, "rules", source),
        tags=_strings(node, "tags", source),
        plugins=_strings(node, "plugins", source),
        min_agents=min_agents,
        hours=_hours(node, source),
    )


def _hours(node: _Map, source: str) -> tuple[int, int] | None:
    text = node.get("hours")
    if text is None:
        return None
    try:
        start, end = (dt.time.fromisoformat(p.strip()) for p in str(text).split("-"))
    except ValueError:
        reason = f"hours must read 'HH:MM-HH:MM' (UTC), got {text!r}"
        raise _fail(source, node, "hours", reason) from None
    return start.hour * 60 + start.minute, end.hour * 60 + end.minute


def _step(node: Any, source: str, line: int) -> Step:
    if not isinstance(node, _Map):
        raise PlaybookError(source, line, "each action must be a mapping")
    action = node.get("action")
    if action not in STEP_ACTIONS:
        reason = f"unknown action {action!r}; known: {', '.join(STEP_ACTIONS)}"
        raise _fail(source, node, "action", reason)
    _no_unknown(node, _STEP_KEYS, source, f"action {action}")
    for key in ("seconds", "duration_s", "ttl_s"):
        if key in node and not _positive(node[key]):
            raise _fail(source, node, key, f"{key} must be a number above 0")
    if action == "wait" and not (
        _positive(node.get("seconds")) and node["seconds"] <= MAX_WAIT_S
    ):
        reason = f"wait needs 'seconds', above 0 and at most {MAX_WAIT_S:.0f}"
        raise _fail(source, node, "seconds", reason)
    targets = node.get("targets", "alert")
    if targets not in ("alert", "all"):
        raise _fail(source, node, "targets", "targets must be 'alert' or 'all'")
    severity = node.get("severity", "high")
    if severity not in SEVERITY_RANK:
        raise _fail(source, node, "severity", "severity must be info..critical")
    params = {k: v for k, v in node.items() if k != "action"}
    return Step(action=action, params=params, line=node.line)


def _no_unknown(node: _Map, known: set[str], source: str, what: str) -> None:
    for key in node:
        if key not in known:
            reason = f"unknown key {key!r} in {what}; known: {', '.join(sorted(known))}"
            raise _fail(source, node, key, reason)


def _typed(node: _Map, key: str, kind: type, default: Any, source: str) -> Any:
    value = node.get(key, default)
    # bool is an int in Python; an int setting must not take true/false.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _fail(source, node, key, f"{key} must be {kind.__name__}")
    return value


def _strings(node: _Map, key: str, source: str) -> tuple[str, ...]:
    value = node.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(source, node, key, f"{key} must be a list of strings")
    return tuple(value)


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0
