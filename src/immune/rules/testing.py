"""Running rules offline: replays of recorded events and the rules' own tests.

A :class:`Replay` passes events, in order, through the rules and the
correlations the way the hive does (an event, then the alerts it raised, then
what those complete), without a bus, so rule authors can check their rules
on a recorded session or in CI with ``immune rules test``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from immune.errors import EventError
from immune.events import Alert, Event, new_id, parse_event
from immune.metrics import Metrics
from immune.rules import _yaml
from immune.rules.correlation import NS, Correlation, Correlator, finding_alert
from immune.rules.errors import RuleError
from immune.rules.ruleset import Rule, RuleSet, event_context

#: Where test events happen unless they say otherwise (2024-01-01 00:00 UTC).
BASE_TS = 1_704_067_200 * NS


def rule_alert(rule: Rule, event: Event, *, ts: int | None = None) -> Alert:
    """The alert the rules plugin raises when ``rule`` matches ``event``."""
    data = event_context(event)
    if rule.file:
        data["rule_file"] = rule.file
    return Alert(
        id=new_id(),
        ts=event.ts if ts is None else ts,
        rule=rule.id,
        title=rule.title,
        severity=rule.severity,
        plugin="rules",
        agent_id=event.agent_id,
        host=event.host,
        event_ids=[event.id],
        techniques=list(rule.techniques),
        description=rule.description,
        data=data,
    )


class Replay:
    """Rules and correlations run over events in order, offline.

    Args:
        ruleset: what to run (enabled rules and correlations).
        correlations: run only these correlations (default: all enabled).
    """

    def __init__(
        self,
        ruleset: RuleSet,
        *,
        correlations: Mapping[str, Correlation] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.ruleset = ruleset
        self.metrics = metrics or Metrics()
        chosen = ruleset.correlations if correlations is None else correlations
        self.correlator = Correlator(chosen, metrics=self.metrics)
        self.alerts: list[Alert] = []

    def feed(self, event: Event) -> list[Alert]:
        """Run one event; return the alerts it led to (also kept in ``alerts``)."""
        raised = [rule_alert(rule, event) for rule in self.ruleset.match(event)]
        pending: list[Event | Alert] = [event, *raised]
        out = list(raised)
        while pending:
            item = pending.pop(0)
            for finding in self.correlator.feed(item):
                alert = finding_alert(finding, ts=finding.ts)
                out.append(alert)
                pending.append(alert)
        self.alerts += out
        return out

    def run(self, events: Iterable[Event]) -> list[Alert]:
        for event in events:
            self.feed(event)
        return self.alerts

    def counts(self) -> Counter[str]:
        """How many alerts each rule or correlation raised."""
        return Counter(alert.rule for alert in self.alerts)


# -- reading events -----------------------------------------------------------


def read_events(path: Path) -> Iterator[Event]:
    """Events from a JSON-lines file: one event, or one batch, per line.

    Raises:
        RuleError: naming the line of an event that is not valid.
    """
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise RuleError(
                    f"not JSON: {exc}", file=str(path), line=number
                ) from None
            items = obj.get("events") if isinstance(obj, dict) else None
            for item in items if isinstance(items, list) else [obj]:
                try:
                    yield parse_event(item)
                except EventError as exc:
                    raise RuleError(exc.reason, file=str(path), line=number) from None


def make_event(fields: Any, index: int, *, file: str | None = None) -> Event:
    """A test event: the fields given, with the required ones filled in.

    ``at`` gives the time in seconds after :data:`BASE_TS`; ``ts`` an
    absolute time in ns; by default events are one second apart.
    """
    if not isinstance(fields, Mapping):
        raise RuleError("a test event must be a mapping of event fields", file=file)
    obj = {k: v for k, v in fields.items() if k != "at"}
    at = fields.get("at", index)
    if isinstance(at, bool) or not isinstance(at, int | float):
        raise RuleError(
            "at: must be a number of seconds",
            file=file,
            line=_yaml.line_of(fields, "at"),
        )
    obj.setdefault("ts", BASE_TS + int(at * NS))
    obj.setdefault("id", f"test-{index}")
    obj.setdefault("agent_id", "test-agent")
    obj.setdefault("host", "test-host")
    try:
        return parse_event(_plain(obj))
    except EventError as exc:
        reason = f"bad test event: {exc.reason}"
        raise RuleError(reason, file=file, line=_yaml.line_of(fields)) from None


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


# -- the rules' own tests -----------------------------------------------------


@dataclass
class TestResult:
    """One of a rule's ``tests:``, run."""

    __test__ = False  # not a pytest class

    target: str
    file: str | None
    line: int | None
    expected: Any
    got: Any
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.expected == self.got

    @property
    def where(self) -> str:
        return f"{self.file or '?'}:{self.line or '?'}"


@dataclass
class Expectations:
    """How many alerts each rule should raise over a replay."""

    counts: dict[str, int] = field(default_factory=dict)
    #: Whether rules not listed must raise nothing.
    exact: bool = False

    def check(self, counts: Mapping[str, int]) -> list[str]:
        """The mismatches, one line each (none: all met)."""
        problems = [
            f"{rule}: expected {want} alerts, got {counts.get(rule, 0)}"
            for rule, want in sorted(self.counts.items())
            if counts.get(rule, 0) != want
        ]
        if self.exact:
            problems += [
                f"{rule}: expected no alerts, got {n}"
                for rule, n in sorted(counts.items())
                if rule not in self.counts
            ]
        return problems


def load_expectations(path: Path) -> Expectations:
    """Read ``expect: {rule: count}`` (and ``exact: true``) from YAML.

    Raises:
        RuleError: the file is not that.
    """
    doc = _yaml.load(path.read_text(encoding="utf-8"), str(path))
    if not isinstance(doc, Mapping) or not isinstance(doc.get("expect"), Mapping):
        raise RuleError(
            "an expectations file needs expect: {rule-id: count}", file=str(path)
        )
    counts = doc["expect"]
    for rule, want in counts.items():
        if isinstance(want, bool) or not isinstance(want, int) or want < 0:
            line = _yaml.line_of(counts, rule)
            raise RuleError(
                f"{rule}: expect a count (0 or more)", file=str(path), line=line
            )
    exact = doc.get("exact", False)
    if not isinstance(exact, bool):
        raise RuleError("exact: must be true or false", file=str(path))
    return Expectations(counts=dict(counts), exact=exact)


def run_rule_tests(
    ruleset: RuleSet, files: Iterable[str] | None = None
) -> list[TestResult]:
    """Run the ``tests:`` of the rules and correlations defined in ``files``.

    Args:
        files: whose rules to test; all when None.
    """
    wanted = None if files is None else set(files)
    results: list[TestResult] = []
    for rule in ruleset.rules.values():
        if wanted is None or rule.file in wanted:
            results += [_rule_test(rule, test) for test in rule.tests]
    for corr in ruleset.correlations.values():
        if wanted is None or corr.file in wanted:
            results += [_correlation_test(ruleset, corr, test) for test in corr.tests]
    return results


def _rule_test(rule: Rule, test: Any) -> TestResult:
    line = _yaml.line_of(test)
    result = TestResult(rule.id, rule.file, line, None, None)
    try:
        if not isinstance(test, Mapping) or "event" not in test:
            raise RuleError("a rule test needs event: and expect: true or false")
        result.expected = test.get("expect", True)
        if not isinstance(result.expected, bool):
            raise RuleError("expect: must be true or false for a rule")
        result.got = rule.matches(make_event(test["event"], 0, file=rule.file))
    except RuleError as exc:
        result.error = exc.reason
    return result


def _correlation_test(ruleset: RuleSet, corr: Correlation, test: Any) -> TestResult:
    line = _yaml.line_of(test)
    result = TestResult(corr.id, corr.file, line, None, None)
    try:
        if not isinstance(test, Mapping) or not isinstance(test.get("events"), list):
            raise RuleError("a correlation test needs events: [...] and expect: N")
        expected = test.get("expect", 1)
        if isinstance(expected, bool):
            expected = int(expected)
        if not isinstance(expected, int) or expected < 0:
            raise RuleError("expect: must be a count of alerts (0 or more)")
        result.expected = expected
        events = [
            make_event(e, n, file=corr.file) for n, e in enumerate(test["events"])
        ]
        replay = Replay(ruleset, correlations={corr.id: corr})
        replay.run(sorted(events, key=lambda e: e.ts) if test.get("sort") else events)
        result.got = replay.counts()[corr.id]
    except RuleError as exc:
        result.error = exc.reason
    return result
