"""Correlations: detections over many events, within time windows.

Three types, each keyed (by host, agent, user, process, indicator or fields)
so that only related things count together:

- ``threshold``: ``count`` matching items for one key within ``window``;
- ``distinct``: ``count`` distinct values of a field for one key within
  ``window`` (one indicator seen on 3 agents: lateral movement);
- ``sequence``: ``stages`` matched in order for one key, the last within
  ``window`` of the first (attack chains).

Items are events, or alerts for filters that say ``alert:``. Windows are
measured with the items' own timestamps (``ts``), so a replay of recorded
events gives the alerts the live stream gave. State is bounded: at most
``max_keys`` keys per correlation, the least recently seen evicted first (and
counted), and a key's state expires once its window has passed. After firing,
a key stays quiet for one window, so one attack gives one alert.
"""

from __future__ import annotations

import bisect
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from immune.events import KINDS, SEVERITY_RANK, Alert, Event, Severity, new_id
from immune.metrics import Metrics
from immune.rules import _yaml
from immune.rules.condition import (
    FIELDS,
    Context,
    Predicate,
    compile_condition,
    getter,
    kinds_of,
)
from immune.rules.ruleset import (
    Rule,
    check_bool,
    check_id,
    check_severity,
    check_techniques,
    check_text,
)

logger = logging.getLogger(__name__)

Item = Event | Alert
Type = Literal["threshold", "distinct", "sequence"]
TYPES = ("threshold", "distinct", "sequence")
NAMED_KEYS = ("host", "agent", "user", "process", "indicator")
DEFAULT_MAX_KEYS = 10_000
CORRELATION_KEYS = frozenset(
    {
        "id",
        "title",
        "description",
        "type",
        "severity",
        "techniques",
        "enabled",
        "key",
        "window",
        "count",
        "distinct",
        "match",
        "stages",
        "max_keys",
        "tests",
    }
)
FILTER_KEYS = frozenset(
    {"name", "rule", "condition", "alert", "min_severity", "plugin"}
)
_INDICATORS = ("sha256", "addr", "exe", "path")
_OPEN_INDICATORS = ("sha256", "path", "exe")
NS = 1_000_000_000


# -- definitions --------------------------------------------------------------


@dataclass(eq=False)
class Filter:
    """What a threshold or distinct correlation counts, or one sequence stage.

    An event filter holds when the event meets ``condition`` and every rule
    named (each rule's condition and exceptions, whether the rule is enabled
    or not). An alert filter holds for alerts of the rules named (or any),
    at ``min_severity`` or worse, from ``plugin`` if given; alerts raised by
    correlations are left out unless ``plugin: correlate`` says otherwise.
    """

    name: str
    on: Literal["event", "alert"]
    event_test: Predicate | None = None
    alert_rules: frozenset[str] | None = None
    min_rank: int = 0
    plugin: str | None = None
    #: The event kinds an event filter can match (None: any).
    kinds: frozenset[str] | None = None

    def matches(self, item: Item) -> bool:
        if isinstance(item, Event):
            if self.on != "event" or self.event_test is None:
                return False
            if self.kinds is not None and item.kind not in self.kinds:
                return False
            return self.event_test(item)
        if self.on != "alert" or SEVERITY_RANK[item.severity] < self.min_rank:
            return False
        if self.plugin is None and item.plugin == "correlate":
            return False
        if self.plugin is not None and item.plugin != self.plugin:
            return False
        return self.alert_rules is None or item.rule in self.alert_rules


@dataclass(eq=False)
class Correlation:
    """One correlation, compiled."""

    id: str
    title: str
    type: Type
    key: tuple[str, ...]
    window_ns: int
    severity: Severity
    filters: tuple[Filter, ...]
    count: int = 1
    distinct: str | None = None
    techniques: tuple[str, ...] = ()
    description: str = ""
    enabled: bool = True
    max_keys: int = DEFAULT_MAX_KEYS
    file: str | None = None
    line: int | None = None
    tests: list[Any] = field(default_factory=list)

    @property
    def on(self) -> set[str]:
        """What the correlation looks at: ``event``, ``alert`` or both."""
        return {f.on for f in self.filters}

    def kinds(self) -> frozenset[str] | None:
        """The event kinds any of its filters can match (None: any)."""
        found: set[str] = set()
        for filt in self.filters:
            if filt.on != "event":
                continue
            if filt.kinds is None:
                return None
            found |= filt.kinds
        return frozenset(found)


def parse_correlation(
    obj: Mapping[str, Any], context: Context, rules: Mapping[str, Rule]
) -> Correlation:
    """Check and compile one correlation.

    Args:
        obj: the correlation as loaded from YAML.
        context: lists, macros and file.
        rules: the rules a filter's ``rule:`` may name.

    Raises:
        RuleError: naming the line and the key at fault.
    """
    unknown = sorted(str(k) for k in obj if k not in CORRELATION_KEYS)
    if unknown:
        known = ", ".join(sorted(CORRELATION_KEYS))
        reason = f"unknown key {unknown[0]!r} in correlation (known: {known})"
        raise context.error(reason, obj, unknown[0])
    ident = check_id(obj, context)
    kind = obj.get("type")
    if kind not in TYPES:
        reason = f"type {kind!r} must be one of {', '.join(TYPES)}"
        raise context.error(reason, obj, "type" if "type" in obj else None)
    filters = _filters(obj, kind, context, rules)
    count = len(filters) if kind == "sequence" else _positive(obj, "count", context)
    return Correlation(
        id=ident,
        title=check_text(obj, "title", context, default=ident),
        description=check_text(obj, "description", context, default=""),
        type=kind,
        key=_key(obj, "key", context),
        window_ns=_window(obj, context),
        severity=check_severity(obj, context, "high"),
        techniques=check_techniques(obj, context),
        enabled=check_bool(obj, "enabled", context, True),
        filters=filters,
        count=count,
        distinct=_key(obj, "distinct", context)[0] if kind == "distinct" else None,
        max_keys=_positive(obj, "max_keys", context, DEFAULT_MAX_KEYS),
        file=context.file,
        line=_yaml.line_of(obj),
        tests=list(obj.get("tests") or []),
    )


def _positive(
    obj: Mapping[str, Any], key: str, context: Context, default: int | None = None
) -> int:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise context.error(f"{key}: must be a whole number of at least 1", obj, key)
    return value


def _window(obj: Mapping[str, Any], context: Context) -> int:
    value = obj.get("window")
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        reason = "window: must be a positive number of seconds"
        raise context.error(reason, obj, "window" if "window" in obj else None)
    return int(value * NS)


def _key(obj: Mapping[str, Any], name: str, context: Context) -> tuple[str, ...]:
    value = obj.get(name)
    parts = value if isinstance(value, list) else [value]
    for part in parts:
        if part not in NAMED_KEYS and not (
            isinstance(part, str) and (part in FIELDS or part.startswith("extra."))
        ):
            reason = (
                f"{name}: {part!r} must be one of {', '.join(NAMED_KEYS)}, an event "
                "field or extra.<name> (or a list of them)"
            )
            raise context.error(reason, obj, name if name in obj else None)
    if name == "distinct" and len(parts) != 1:
        raise context.error("distinct: takes one field", obj, name)
    return tuple(parts)


def _filters(
    obj: Mapping[str, Any], kind: str, context: Context, rules: Mapping[str, Rule]
) -> tuple[Filter, ...]:
    if kind == "sequence":
        stages = obj.get("stages")
        if not isinstance(stages, list) or len(stages) < 2:
            raise context.error("stages: a sequence needs a list of 2 or more", obj)
        return tuple(
            _filter(s, f"stage {n}", context, rules) for n, s in enumerate(stages, 1)
        )
    if "stages" in obj:
        raise context.error(f"stages: only for sequences, not {kind}", obj, "stages")
    if "match" not in obj:
        raise context.error(f"a {kind} correlation needs match:", obj)
    return (_filter(obj["match"], "match", context, rules),)


def _filter(
    obj: Any, default_name: str, context: Context, rules: Mapping[str, Rule]
) -> Filter:
    if not isinstance(obj, Mapping) or not (set(obj) & {"rule", "condition", "alert"}):
        reason = f"{default_name}: needs rule:, condition: or alert:"
        raise context.error(reason, obj)
    unknown = sorted(str(k) for k in obj if k not in FILTER_KEYS)
    if unknown:
        known = ", ".join(sorted(FILTER_KEYS))
        raise context.error(
            f"unknown key {unknown[0]!r} (known: {known})", obj, unknown[0]
        )
    name = str(obj.get("name", default_name))
    if "alert" in obj:
        return _alert_filter(obj, name, context)
    if set(obj) & {"min_severity", "plugin"}:
        raise context.error("min_severity and plugin: only with alert:", obj)
    tests: list[Predicate] = []
    kinds: list[frozenset[str] | None] = []
    for rule_id in _names(obj, "rule", context):
        if rule_id not in rules:
            raise context.error(f"unknown rule {rule_id!r}", obj, "rule")
        rule = rules[rule_id]
        # The filter sees events of the rule's kinds only (see its kinds).
        tests.append(rule.matches if rule.kinds is None else rule.matches_indexed)
        kinds.append(rule.kinds)
    if "condition" in obj:
        tests.append(compile_condition(obj["condition"], context))
        kinds.append(kinds_of(obj["condition"], context.macros))
    test = tests[0] if len(tests) == 1 else (lambda e: all(t(e) for t in tests))
    limits = [k for k in kinds if k is not None]
    can_match = frozenset.intersection(*limits) if limits else None
    return Filter(name=name, on="event", event_test=test, kinds=can_match)


def _alert_filter(obj: Mapping[str, Any], name: str, context: Context) -> Filter:
    if set(obj) & {"rule", "condition"}:
        raise context.error("alert: filters cannot also have rule: or condition:", obj)
    wanted = None if obj["alert"] == "any" else frozenset(_names(obj, "alert", context))
    severity = obj.get("min_severity", "info")
    if severity not in SEVERITY_RANK:
        raise context.error(
            f"min_severity {severity!r} is not a severity", obj, "min_severity"
        )
    plugin = obj.get("plugin")
    if plugin is not None and not isinstance(plugin, str):
        raise context.error("plugin: must be a plugin name", obj, "plugin")
    return Filter(
        name=name,
        on="alert",
        alert_rules=wanted,
        min_rank=SEVERITY_RANK[severity],
        plugin=plugin,
    )


def _names(obj: Mapping[str, Any], key: str, context: Context) -> list[str]:
    value = obj.get(key, [])
    names = value if isinstance(value, list) else [value]
    if not all(isinstance(n, str) for n in names):
        raise context.error(f"{key}: must be an id or a list of ids", obj, key)
    return names


# -- keys ---------------------------------------------------------------------


def key_part(item: Item, part: str) -> Any:
    """One part of an item's key (None when the item lacks it)."""
    if isinstance(item, Event):
        return _event_part(item, part)
    return _alert_part(item, part)


def _event_part(event: Event, part: str) -> Any:
    if part == "agent":
        return event.agent_id
    if part == "user":
        return None if event.uid is None else f"{event.agent_id}/{event.uid}"
    if part == "process":
        return None if event.pid is None else f"{event.agent_id}/{event.pid}"
    if part == "indicator":
        sha = event.extra.get("sha256") if event.extra else None
        if event.kind == "open":
            # The file opened, not the program that opened it: cat reading
            # /etc/shadow on three hosts is no one indicator on three.
            return sha or event.path or event.exe
        return sha or event.addr or event.exe or event.path
    return getter(part)(event)


def _alert_part(alert: Alert, part: str) -> Any:
    data = alert.data
    if part == "host":
        return alert.host
    if part in ("agent", "agent_id"):
        return alert.agent_id
    if part == "user":
        return None if "uid" not in data else f"{alert.agent_id}/{data['uid']}"
    if part == "process":
        return None if "pid" not in data else f"{alert.agent_id}/{data['pid']}"
    if part == "indicator":
        order = _OPEN_INDICATORS if data.get("kind") == "open" else _INDICATORS
        return next((data[k] for k in order if data.get(k)), None)
    if part == "rule":
        return alert.rule
    return data.get(part.removeprefix("extra."))


# -- state --------------------------------------------------------------------


@dataclass
class Finding:
    """A correlation that fired: what for, and the items behind it."""

    correlation: Correlation
    key: tuple[Any, ...]
    items: list[Item]
    ts: int

    @property
    def key_text(self) -> str:
        return ",".join(
            f"{name}={value}"
            for name, value in zip(self.correlation.key, self.key, strict=True)
        )


class _State:
    __slots__ = ("items", "last", "levels", "fired_at", "suppressed")

    def __init__(self, stages: int) -> None:
        # threshold: (ts, n, item) sorted; distinct: value -> (ts, item);
        # sequence: per completed-stage count, (start, last, items).
        self.items: list[tuple[int, int, Item]] = []
        self.levels: list[tuple[int, int, list[Item]] | None] = [None] * stages
        self.last = 0
        self.fired_at: int | None = None
        self.suppressed = 0


class _Distinct(_State):
    __slots__ = ("values",)

    def __init__(self, stages: int) -> None:
        super().__init__(stages)
        self.values: dict[Any, tuple[int, Item]] = {}


class Correlator:
    """Runs the enabled correlations of a rule set over events and alerts.

    Args:
        correlations: the correlations to run.
        metrics: where to count evictions, late and unkeyed items.
        max_keys: a cap on keys per correlation, over the correlation's own.
    """

    def __init__(
        self,
        correlations: Mapping[str, Correlation],
        *,
        metrics: Metrics | None = None,
        max_keys: int | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.correlations = [c for c in correlations.values() if c.enabled]
        self.max_keys = max_keys
        self.states: dict[str, OrderedDict[tuple[Any, ...], _State]] = {
            c.id: OrderedDict() for c in self.correlations
        }
        self.now: dict[str, int] = {c.id: 0 for c in self.correlations}
        # For each event kind, the correlations and the tests of the stages
        # that can use it, so that an event meets those tests alone.
        self._by_kind: dict[str, list[tuple[Correlation, list[tuple[int, Predicate]]]]]
        self._by_kind = {kind: self._index(kind) for kind in KINDS}
        self._on_alerts = [
            (c, [(n, f) for n, f in enumerate(c.filters) if f.on == "alert"])
            for c in self.correlations
            if "alert" in c.on
        ]

    def _index(
        self, kind: str
    ) -> list[tuple[Correlation, list[tuple[int, Predicate]]]]:
        index = []
        for corr in self.correlations:
            filters = [
                (n, f.event_test)
                for n, f in enumerate(corr.filters)
                if f.on == "event"
                and f.event_test is not None
                and (f.kinds is None or kind in f.kinds)
            ]
            if filters:
                index.append((corr, filters))
        return index

    def keys(self, correlation_id: str) -> int:
        """How many keys a correlation holds state for."""
        return len(self.states[correlation_id])

    def feed(self, item: Item) -> list[Finding]:
        """Take one event or alert; return the correlations it completes."""
        found = []
        if isinstance(item, Event):
            for corr, tests in self._by_kind.get(item.kind, ()):
                stages = [n for n, test in tests if test(item)]
                if stages:
                    finding = self._feed_one(corr, stages, item)
                    if finding is not None:
                        found.append(finding)
            return found
        for corr, filters in self._on_alerts:
            stages = [n for n, f in filters if f.matches(item)]
            if stages:
                finding = self._feed_one(corr, stages, item)
                if finding is not None:
                    found.append(finding)
        return found

    def _feed_one(
        self, corr: Correlation, stages: list[int], item: Item
    ) -> Finding | None:
        key = tuple(key_part(item, part) for part in corr.key)
        if any(part is None for part in key):
            self.metrics.inc("correlate.unkeyed")
            return None
        ts = item.ts
        now = self.now[corr.id] = max(self.now[corr.id], ts)
        if ts < now - corr.window_ns:
            self.metrics.inc("correlate.late")
            return None
        state = self._state(corr, key, ts)
        if state.fired_at is not None:
            if ts - state.fired_at <= corr.window_ns:
                state.suppressed += 1
                self.metrics.inc("correlate.suppressed")
                return None
            state = self._reset(corr, key)
        state.last = max(state.last, ts)
        items = _STEP[corr.type](corr, state, stages, item)
        self._expire(corr, now)
        if items is None:
            return None
        state.fired_at = ts
        state.items, state.levels = [], [None] * len(state.levels)
        if isinstance(state, _Distinct):
            state.values = {}
        return Finding(corr, key, items, ts)

    def _state(self, corr: Correlation, key: tuple[Any, ...], ts: int) -> _State:
        table = self.states[corr.id]
        state = table.get(key)
        if state is None:
            return self._reset(corr, key)
        if ts - max(state.last, state.fired_at or 0) > corr.window_ns:
            return self._reset(corr, key)
        table.move_to_end(key)
        return state

    def _reset(self, corr: Correlation, key: tuple[Any, ...]) -> _State:
        table = self.states[corr.id]
        table.pop(key, None)
        cls = _Distinct if corr.type == "distinct" else _State
        state = table[key] = cls(len(corr.filters))
        cap = min(corr.max_keys, self.max_keys or corr.max_keys)
        while len(table) > cap:
            table.popitem(last=False)
            self.metrics.inc("correlate.evicted")
        return state

    def _expire(self, corr: Correlation, now: int) -> None:
        # The least recently seen keys come first; drop a few expired ones per
        # item, so that expiry costs little and never piles up.
        table = self.states[corr.id]
        for _ in range(4):
            if not table:
                return
            key, state = next(iter(table.items()))
            if now - max(state.last, state.fired_at or 0) <= corr.window_ns:
                return
            del table[key]
            self.metrics.inc("correlate.expired")


def _threshold(
    corr: Correlation, state: _State, _stages: list[int], item: Item
) -> list[Item] | None:
    oldest = state.last - corr.window_ns
    entries = [e for e in state.items if e[0] >= oldest]
    bisect.insort(entries, (item.ts, id(item), item), key=lambda e: (e[0], e[1]))
    del entries[: max(0, len(entries) - corr.count)]
    state.items = entries
    if len(entries) < corr.count:
        return None
    return [e[2] for e in entries]


def _distinct(
    corr: Correlation, state: _State, _stages: list[int], item: Item
) -> list[Item] | None:
    assert isinstance(state, _Distinct)  # noqa: S101 - _reset makes it so
    assert corr.distinct is not None  # noqa: S101 - parse_correlation checks
    value = key_part(item, corr.distinct)
    if value is None:
        return None
    oldest = state.last - corr.window_ns
    values = {v: e for v, e in state.values.items() if e[0] >= oldest}
    previous = values.get(value)
    if previous is None or previous[0] <= item.ts:
        values[value] = (item.ts, item)
    state.values = values
    if len(values) < corr.count:
        return None
    return [e[1] for e in sorted(values.values(), key=lambda e: e[0])]


def _sequence(
    corr: Correlation, state: _State, stages: list[int], item: Item
) -> list[Item] | None:
    levels, ts, last = state.levels, item.ts, len(corr.filters) - 1
    # From the last stage down, so that one item never fills two stages.
    for stage in reversed(stages):
        if stage == 0:
            candidate: tuple[int, int, list[Item]] = (ts, ts, [item])
        else:
            done = levels[stage]
            if done is None or ts < done[1] or ts - done[0] > corr.window_ns:
                continue
            candidate = (done[0], ts, [*done[2], item])
        if stage == last:
            return candidate[2]
        current = levels[stage + 1]
        # A later start leaves more time for the stages to come; on a tie,
        # the first evidence is kept.
        if (
            current is None
            or candidate[0] > current[0]
            or (ts - current[0] > corr.window_ns)
        ):
            levels[stage + 1] = candidate
    return None


_STEP: dict[
    str, Callable[[Correlation, _State, list[int], Item], list[Item] | None]
] = {
    "threshold": _threshold,
    "distinct": _distinct,
    "sequence": _sequence,
}


# -- alerts -------------------------------------------------------------------


def finding_alert(finding: Finding, *, ts: int) -> Alert:
    """The alert for a finding, with the events and alerts behind it.

    Args:
        finding: what fired.
        ts: the alert's time (now, live; the finding's, in replays).
    """
    corr, items = finding.correlation, finding.items
    event_ids: list[str] = []
    alert_ids: list[str] = []
    techniques = list(corr.techniques)
    for item in items:
        if isinstance(item, Event):
            event_ids.append(item.id)
        else:
            alert_ids.append(item.id)
            event_ids += item.event_ids
            techniques += [t for t in item.techniques if t not in techniques]
    agents = sorted({a for a in (_agent(i) for i in items) if a})
    first = items[0]
    data: dict[str, Any] = {
        "type": corr.type,
        "key": finding.key_text,
        "count": len(items),
        "agents": agents,
        "hosts": sorted({h for h in (_host(i) for i in items) if h}),
        "window_s": corr.window_ns / NS,
        "first_ts": min(i.ts for i in items),
        "last_ts": max(i.ts for i in items),
    }
    if alert_ids:
        data["alert_ids"] = alert_ids
        data["rules"] = sorted({i.rule for i in items if isinstance(i, Alert)})
    if corr.type == "sequence":
        data["stages"] = [f.name for f in corr.filters]
    data.update(_context(items))
    return Alert(
        id=new_id(),
        ts=ts,
        rule=corr.id,
        title=corr.title,
        severity=corr.severity,
        plugin="correlate",
        agent_id=_agent(first),
        host=_host(first),
        event_ids=list(dict.fromkeys(event_ids)),
        techniques=techniques,
        description=corr.description,
        count=len(items),
        data=data,
    )


#: What a finding's alert takes from its items, for the playbooks' commands
#: (the address to block, the process to kill, the file to quarantine).
_CONTEXT = ("addr", "port", "pid", "exe", "path")


def _context(items: list[Item]) -> dict[str, Any]:
    """Each of :data:`_CONTEXT` from the first item that has it; an address
    and its port come from the same item."""
    found: dict[str, Any] = {}
    for item in items:
        values = {n: _value(item, n) for n in _CONTEXT if n not in found}
        if "addr" in values and values["addr"] is None:
            values.pop("port", None)
        found.update({n: v for n, v in values.items() if v is not None})
    return found


def _value(item: Item, name: str) -> Any:
    if isinstance(item, Event):
        return getattr(item, name)
    return item.data.get(name)


def _agent(item: Item) -> str | None:
    return item.agent_id


def _host(item: Item) -> str | None:
    return item.host
