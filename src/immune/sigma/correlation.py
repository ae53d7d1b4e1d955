"""Sigma correlation rules: counts, distinct values and sequences over time.

A correlation rule refers to detection rules and fires when their matches,
grouped by the values of its ``group-by`` fields, meet its condition within
its ``timespan``:

- ``event_count``: at least (or more than) N matching events;
- ``value_count``: at least (or more than) N distinct values of a field;
- ``temporal``: matches of (at least N of) the rules, in any order;
- ``temporal_ordered``: matches of all the rules, in the order listed.

Time is the events' own ``ts``, so a batch that arrives late is judged by
when things happened. Conditions are decided as events arrive, so those
that need the window to close first (``lt``, ``lte``, ``eq``, ``neq``) are
refused, as are the aggregations over values (``value_sum``...).

State is bounded: each group holds at most what its condition needs, groups
idle for longer than their timespan are dropped, and past ``max_groups``
the least recently active group is forgotten (and counted).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from sigma.correlations import (
    SigmaCorrelationConditionOperator,
    SigmaCorrelationRule,
    SigmaCorrelationType,
    SigmaExtendedCorrelationCondition,
)
from sigma.rule import SigmaRule

from immune.events import Event, Severity
from immune.sigma.fields import SIGMA_FIELDS, Subject, Value
from immune.sigma.loader import LEVEL_SEVERITY, DetectionRule, rule_id, techniques
from immune.sigma.text import UnsupportedError

_TYPES = {
    SigmaCorrelationType.EVENT_COUNT: "event_count",
    SigmaCorrelationType.VALUE_COUNT: "value_count",
    SigmaCorrelationType.TEMPORAL: "temporal",
    SigmaCorrelationType.TEMPORAL_ORDERED: "temporal_ordered",
}
_OPS = {
    SigmaCorrelationConditionOperator.GT: "gt",
    SigmaCorrelationConditionOperator.GTE: "gte",
}
# Fields every event has, which a correlation may group by in any log source.
_COMMON = {"host": "host", "agent_id": "agent_id"}


@dataclass
class CorrelationRule:
    """A Sigma correlation rule, compiled.

    Args:
        rules: the ids of the detection rules it counts, in order.
        group_by: for each of those rules, the IMMUNE fields that make the key.
        value_field: for ``value_count``, the IMMUNE field counted, per rule.
        needed: how many events, values or rules fire it (``gt`` is turned
            into ``gte`` of one more).
    """

    id: str
    title: str
    file: str
    type: str
    severity: Severity
    techniques: tuple[str, ...]
    description: str
    rules: tuple[str, ...]
    group_by: dict[str, tuple[str, ...]]
    timespan_ns: int
    needed: int
    value_field: dict[str, str] = field(default_factory=dict)
    output: bool = True


@dataclass
class CorrelationHit:
    """A correlation rule that fired, with the events that made it."""

    rule: CorrelationRule
    key: tuple[Value, ...]
    events: list[Event]


def compile_correlation(
    rule: SigmaCorrelationRule, compiled: dict[int, DetectionRule]
) -> CorrelationRule:
    """Compile a correlation rule, its references resolved, over detection rules.

    Args:
        compiled: compiled detection rules by ``id()`` of their pySigma rule.

    Raises:
        UnsupportedError: a type, condition or reference IMMUNE cannot follow.
    """
    kind = _TYPES.get(rule.type)
    if kind is None:
        raise UnsupportedError(f"correlation type {rule.type} is not supported")
    if isinstance(rule.condition, SigmaExtendedCorrelationCondition):
        raise UnsupportedError("extended correlation conditions are not supported")
    op = _OPS.get(rule.condition.op)
    if op is None:
        name = rule.condition.op.name.lower()
        msg = f"condition {name}: only gt and gte can be decided as events arrive"
        raise UnsupportedError(msg)
    members = [_member(ref.rule, compiled) for ref in rule.referenced_rules]
    count = rule.condition.count
    needed = int(count) + 1 if op == "gt" else int(-(-count // 1))
    group_by = {
        member.id: tuple(_field(rule, member, name) for name in rule.group_by or ())
        for member in members
    }
    value_field: dict[str, str] = {}
    if kind == "value_count":
        ref = rule.condition.fieldref
        names = ref if isinstance(ref, list) else [ref]
        if len(names) != 1 or names[0] is None:
            raise UnsupportedError("value_count over several fields is not supported")
        value_field = {m.id: _field(rule, m, names[0]) for m in members}
    level = str(rule.level) if rule.level is not None else "medium"
    return CorrelationRule(
        id=rule_id(rule),
        title=rule.title or rule_id(rule),
        file=str(rule.source.path) if rule.source and rule.source.path else "?",
        type=kind,
        severity=LEVEL_SEVERITY.get(level, "medium"),
        techniques=techniques(str(tag) for tag in rule.tags),
        description=(rule.description or "").strip(),
        rules=tuple(m.id for m in members),
        group_by=group_by,
        timespan_ns=rule.timespan.seconds * 1_000_000_000,
        needed=max(needed, 1),
        value_field=value_field,
        output=rule._output,
    )


def _member(rule: object, compiled: dict[int, DetectionRule]) -> DetectionRule:
    if not isinstance(rule, SigmaRule):
        raise UnsupportedError("a correlation of correlations is not supported")
    member = compiled.get(id(rule))
    if member is None:
        raise UnsupportedError(f"it refers to rule {rule_id(rule)}, which is refused")
    return member


def _field(rule: SigmaCorrelationRule, member: DetectionRule, name: str) -> str:
    """The IMMUNE field a group-by (or alias) name stands for in one member rule."""
    for alias in rule.aliases:
        if alias.alias == name:
            for ref, target in alias.mapping.items():
                if ref.reference in (member.id, member.name):
                    name = target
                    break
            else:
                msg = f"alias {name!r} has no field for rule {member.id}"
                raise UnsupportedError(msg)
    mapped = SIGMA_FIELDS.get(member.source, {}).get(name) or _COMMON.get(name)
    if mapped is None:
        msg = f"group-by field {name!r} has no IMMUNE equivalent in {member.source}"
        raise UnsupportedError(msg)
    return mapped


# -- state -------------------------------------------------------------------


@dataclass
class _Group:
    """What one correlation remembers for one key."""

    last_ns: int
    events: list[tuple[int, str, Value, Event]] = field(default_factory=list)


class Correlator:
    """Follows every correlation rule over the stream of detection matches.

    Args:
        rules: the compiled correlation rules.
        max_groups: the most (rule, key) groups held at once, at least 1.
    """

    def __init__(self, rules: list[CorrelationRule], max_groups: int = 10_000) -> None:
        if max_groups < 1:
            raise ValueError(f"max_groups must be at least 1, got {max_groups}")
        self.max_groups = max_groups
        self.by_member: dict[str, list[CorrelationRule]] = {}
        for rule in rules:
            for member in dict.fromkeys(rule.rules):
                self.by_member.setdefault(member, []).append(rule)
        self._groups: OrderedDict[tuple[str, tuple[Value, ...]], _Group] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._groups)

    def observe(
        self, matched: list[DetectionRule], subject: Subject
    ) -> list[CorrelationHit]:
        """Account for the detection rules one event matched; return what fired."""
        hits: list[CorrelationHit] = []
        for member in matched:
            for rule in self.by_member.get(member.id, ()):
                hit = self._step(rule, member.id, subject)
                if hit is not None:
                    hits.append(hit)
        return hits

    def _step(
        self, rule: CorrelationRule, member: str, subject: Subject
    ) -> CorrelationHit | None:
        event = subject.event
        key = tuple(subject.value(f) for f in rule.group_by[member])
        group = self._group(rule, key, event.ts)
        cutoff = event.ts - rule.timespan_ns
        group.events = [entry for entry in group.events if entry[0] >= cutoff]
        value = subject.value(rule.value_field[member]) if rule.value_field else None
        if rule.type == "value_count":
            if value is None:
                return None
            # Only the latest event of each value counts: bounded by `needed`.
            group.events = [entry for entry in group.events if entry[2] != value]
        elif rule.type == "temporal":
            group.events = [entry for entry in group.events if entry[1] != member]
        group.events.append((event.ts, member, value, event))
        if rule.type == "temporal_ordered":
            group.events = _in_order(group.events, rule.rules)
        if _progress(rule, group.events) < rule.needed:
            return None
        del self._groups[(rule.id, key)]
        return CorrelationHit(rule, key, [entry[3] for entry in group.events])

    def _group(self, rule: CorrelationRule, key: tuple[Value, ...], ts: int) -> _Group:
        index = (rule.id, key)
        group = self._groups.get(index)
        if group is None or ts - group.last_ns > rule.timespan_ns:
            group = self._groups[index] = _Group(ts)
        group.last_ns = max(group.last_ns, ts)
        self._groups.move_to_end(index)
        while len(self._groups) > self.max_groups:
            self._groups.popitem(last=False)
            self.evicted += 1
        return group


def _progress(
    rule: CorrelationRule, events: list[tuple[int, str, Value, Event]]
) -> int:
    if rule.type == "event_count":
        return len(events)
    if rule.type == "value_count":
        return len({entry[2] for entry in events})
    if rule.type == "temporal":
        return len({entry[1] for entry in events})
    return len(events)  # temporal_ordered: the events kept are the sequence so far


def _in_order(
    events: list[tuple[int, str, Value, Event]], order: tuple[str, ...]
) -> list[tuple[int, str, Value, Event]]:
    """The longest prefix of ``order`` the events make, earliest start kept."""
    sequence: list[tuple[int, str, Value, Event]] = []
    for entry in events:
        if len(sequence) < len(order) and entry[1] == order[len(sequence)]:
            sequence.append(entry)
        elif entry[1] == order[0]:
            sequence = [entry]
    return sequence
