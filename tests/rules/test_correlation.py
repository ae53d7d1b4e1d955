"""Correlations: threshold, distinct and sequence, their windows and state."""

from __future__ import annotations

import pytest

from immune.events import Alert, Event
from immune.metrics import Metrics
from immune.rules import Correlator, RuleError, finding_alert

from .helpers import NS, T0, ev, ruleset

THRESHOLD = """\
correlations:
  - id: burst
    type: threshold
    key: [agent, port]
    count: 3
    window: 60
    techniques: [T1041]
    match: {condition: {kind: connect}}
"""

DISTINCT = """\
correlations:
  - id: spread
    type: distinct
    key: indicator
    distinct: agent
    count: 3
    window: 300
    match: {alert: any, min_severity: medium}
"""

SEQUENCE = """\
rules:
  - id: temp-exec
    techniques: [T1204.002]
    condition: {kind: exec, exe: {startswith: /tmp/}}
correlations:
  - id: chain
    type: sequence
    key: agent
    window: 100
    severity: critical
    stages:
      - {name: one, rule: temp-exec}
      - {name: two, condition: {kind: connect, port: 4444}}
      - {name: three, condition: {kind: setuid, euid: 0}}
"""


def run(text, items, **kwargs):
    rules = ruleset(text)
    metrics = Metrics()
    correlator = Correlator(rules.correlations, metrics=metrics, **kwargs)
    found = [f for item in items for f in correlator.feed(item)]
    return found, correlator, metrics


def conn(at, agent="a1", port=443, addr="198.51.100.1"):
    return ev("connect", agent=agent, at=at, addr=addr, port=port)


def alert(agent, at, indicator="198.51.100.9", severity="high", plugin="rules"):
    return Alert(
        id=f"al-{agent}-{at}",
        ts=T0 + int(at * NS),
        rule="connect-to-blocked-port",
        title="t",
        severity=severity,
        plugin=plugin,
        agent_id=agent,
        host=f"{agent}.test",
        event_ids=[f"e-{agent}-{at}"],
        techniques=["T1571"],
        data={"addr": indicator, "port": 4444},
    )


def test_threshold_fires_once_at_the_count_then_stays_quiet():
    items = [conn(t) for t in (0, 10, 20, 30, 40)]
    found, correlator, metrics = run(THRESHOLD, items)
    assert len(found) == 1
    assert [i.id for i in found[0].items] == [i.id for i in items[:3]]
    assert metrics.get("correlate.suppressed") == 2


def test_threshold_fires_again_after_the_quiet_window():
    items = [conn(t) for t in (0, 1, 2, 100, 101, 102)]
    found, _, _ = run(THRESHOLD, items)
    assert [f.ts for f in found] == [T0 + 2 * NS, T0 + 102 * NS]


def test_threshold_events_outside_the_window_do_not_count():
    found, _, _ = run(THRESHOLD, [conn(0), conn(61), conn(122)])
    assert found == []


def test_threshold_keys_are_separate():
    items = [conn(0, port=1), conn(1, port=2), conn(2, port=1), conn(3, agent="b")]
    assert run(THRESHOLD, items)[0] == []


def test_distinct_counts_agents_per_indicator():
    items = [alert("a1", 0), alert("a1", 1), alert("a2", 2), alert("a3", 3)]
    found, _, _ = run(DISTINCT, items)
    assert len(found) == 1
    assert sorted(i.agent_id for i in found[0].items) == ["a1", "a2", "a3"]


def test_distinct_ignores_low_alerts_and_correlation_alerts():
    items = [
        alert("a1", 0),
        alert("a2", 1, severity="low"),
        alert("a3", 2, plugin="correlate"),
        alert("a4", 3, indicator="203.0.113.1"),
    ]
    assert run(DISTINCT, items)[0] == []


def test_distinct_window_expires_old_agents():
    items = [alert("a1", 0), alert("a2", 100), alert("a3", 301)]
    assert run(DISTINCT, items)[0] == []


def test_sequence_fires_on_the_stages_in_order():
    items = [
        ev("exec", at=0, exe="/tmp/x"),
        ev("connect", at=1, port=4444),
        ev("exec", at=2, exe="/usr/bin/ls"),
        ev("setuid", at=3, euid=0),
    ]
    found, _, _ = run(SEQUENCE, items)
    assert len(found) == 1
    assert [i.id for i in found[0].items] == [items[0].id, items[1].id, items[3].id]


def test_sequence_out_of_order_or_too_slow_does_not_fire():
    wrong_order = [
        ev("connect", at=0, port=4444),
        ev("exec", at=1, exe="/tmp/x"),
        ev("setuid", at=2, euid=0),
    ]
    too_slow = [
        ev("exec", at=0, exe="/tmp/x"),
        ev("connect", at=50, port=4444),
        ev("setuid", at=101, euid=0),
    ]
    assert run(SEQUENCE, wrong_order)[0] == []
    assert run(SEQUENCE, too_slow)[0] == []


def test_sequence_a_later_first_stage_starts_a_fresh_chain():
    items = [
        ev("exec", at=0, exe="/tmp/x"),
        ev("exec", at=80, exe="/tmp/y"),
        ev("connect", at=90, port=4444),
        ev("setuid", at=150, euid=0),  # 150 s after the first, 70 after the second
    ]
    found, _, _ = run(SEQUENCE, items)
    assert [i.id for i in found[0].items] == [items[1].id, items[2].id, items[3].id]


def test_sequence_chains_of_other_agents_do_not_mix():
    items = [
        ev("exec", agent="a", at=0, exe="/tmp/x"),
        ev("connect", agent="b", at=1, port=4444),
        ev("setuid", agent="a", at=2, euid=0),
    ]
    assert run(SEQUENCE, items)[0] == []


def test_state_is_capped_and_evictions_are_counted():
    items = [conn(t, agent=f"a{t}") for t in range(50)]
    _, correlator, metrics = run(THRESHOLD, items, max_keys=10)
    assert correlator.keys("burst") == 10
    assert metrics.get("correlate.evicted") == 40


def test_expired_keys_are_dropped():
    items = [conn(0, agent="old"), *[conn(1000 + t) for t in range(5)]]
    _, correlator, metrics = run(THRESHOLD, items)
    assert correlator.keys("burst") == 1
    assert metrics.get("correlate.expired") == 1


def test_late_and_unkeyed_items_are_counted():
    items = [conn(1000), conn(0), ev("connect", at=1001, addr="x")]
    _, _, metrics = run(THRESHOLD, items)
    assert metrics.get("correlate.late") == 1
    assert metrics.get("correlate.unkeyed") == 1


def test_finding_alert_carries_key_count_agents_events_and_techniques():
    items = [alert("a1", 0), alert("a2", 1), alert("a3", 2)]
    found, _, _ = run(DISTINCT, items)
    made = finding_alert(found[0], ts=123)
    assert made.rule == "spread" and made.plugin == "correlate"
    assert made.event_ids == ["e-a1-0", "e-a2-1", "e-a3-2"]
    assert made.techniques == ["T1571"]
    assert made.count == 3
    assert made.data["key"] == "indicator=198.51.100.9"
    assert made.data["agents"] == ["a1", "a2", "a3"]
    assert made.data["alert_ids"] == [i.id for i in items]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ("type: sometimes\n", "type 'sometimes'"),
        ("type: threshold\n    key: agent\n    count: 2\n    window: 5\n", "match:"),
        (
            "type: threshold\n    key: agent\n    count: 0\n    window: 5\n"
            "    match: {condition: {uid: 0}}\n",
            "count: must be",
        ),
        (
            "type: threshold\n    key: planet\n    count: 2\n    window: 5\n"
            "    match: {condition: {uid: 0}}\n",
            "key: 'planet'",
        ),
        (
            "type: threshold\n    key: agent\n    count: 2\n    window: -1\n"
            "    match: {condition: {uid: 0}}\n",
            "window",
        ),
        (
            "type: sequence\n    key: agent\n    window: 5\n"
            "    stages: [{rule: nope}, {rule: nope}]\n",
            "unknown rule 'nope'",
        ),
        (
            "type: sequence\n    key: agent\n    window: 5\n    stages: [{rule: r}]\n",
            "2 or more",
        ),
    ],
)
def test_correlation_refusals(body, words):
    text = (
        "rules:\n  - id: r\n    condition: {uid: 0}\n"
        f"correlations:\n  - id: c\n    {body}"
    )
    with pytest.raises(RuleError) as info:
        ruleset(text)
    assert words in info.value.reason
    assert info.value.line is not None


def test_sequence_stage_may_be_an_alert_of_a_rule():
    text = """\
correlations:
  - id: alert-then-exec
    type: sequence
    key: agent
    window: 60
    stages:
      - {alert: connect-to-blocked-port, min_severity: high}
      - {condition: {kind: exec, exe_name: sh}}
"""
    first = alert("a1", 0)
    found, _, _ = run(text, [first, ev("exec", agent="a1", at=5, exe="/bin/sh")])
    assert [i.id for i in found[0].items][0] == first.id
    low = alert("a1", 0, severity="medium")
    assert run(text, [low, ev("exec", agent="a1", at=5, exe="/bin/sh")])[0] == []


def test_indicator_of_a_file_opened_is_the_file_not_the_program() -> None:
    from immune.rules.correlation import key_part

    opened = Event(
        id="i-1",
        agent_id="a",
        host="h",
        ts=1,
        kind="open",
        path="/etc/shadow",
        exe="/usr/bin/cat",
    )
    assert key_part(opened, "indicator") == "/etc/shadow"
    ran = Event(id="i-2", agent_id="a", host="h", ts=1, kind="exec", exe="/tmp/x")
    assert key_part(ran, "indicator") == "/tmp/x"
    alert = Alert(
        id="al-1",
        ts=1,
        rule="r",
        title="t",
        severity="high",
        plugin="rules",
        data={"kind": "open", "path": "/etc/shadow", "exe": "/usr/bin/cat"},
    )
    assert key_part(alert, "indicator") == "/etc/shadow"


def test_correlation_rule_stage_holds_for_the_rules_kinds_only():
    # A stage naming a rule skips the rule's kind test on the events the
    # index hands it; asked directly, the stage still tests the kind.
    rules = ruleset(SEQUENCE)
    first = rules.correlations["chain"].filters[0]
    assert first.kinds == frozenset({"exec"})
    assert first.matches(ev(exe="/tmp/x"))
    assert not first.matches(ev("fork", exe="/tmp/x"))
    assert not first.matches(ev(exe="/usr/bin/x"))
