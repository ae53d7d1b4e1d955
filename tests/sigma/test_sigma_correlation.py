"""Sigma correlation rules: counts, distinct values and ordered sequences."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sigma_helpers import RULES, ev

from immune.events import Event
from immune.sigma import SigmaEngine, load_rules

S = 1_000_000_000
T0 = 1_700_000_000 * S
RULESET = load_rules([RULES])
COUNT = "IMMUNE test - five connections to port 4444 from one host"
VALUES = "IMMUNE test - connections to three addresses on port 4444"
CHAIN = "IMMUNE test - temp-dir program then shadow read, same host"


def connect(at: float, agent: str = "web-1", addr: str = "203.0.113.1") -> Event:
    return ev("connect", agent=agent, ts=T0 + int(at * S), addr=addr, port=4444)


def fired(events: list[Event], engine: SigmaEngine | None = None) -> list[str]:
    engine = engine or SigmaEngine(RULESET)
    return [hit.rule.title for e in events for hit in engine.evaluate(e).correlations]


def test_sigma_correlations_load_with_their_settings() -> None:
    rules = {rule.title: rule for rule in RULESET.correlations}
    assert rules[COUNT].type == "event_count" and rules[COUNT].needed == 5
    assert rules[COUNT].timespan_ns == 60 * S
    assert rules[VALUES].type == "value_count" and rules[VALUES].needed == 3
    assert rules[CHAIN].type == "temporal_ordered" and rules[CHAIN].needed == 2
    assert set(rules[COUNT].group_by.values()) == {("host",)}
    # The base rule feeds the counts only (generate is false)...
    base = {r.title: r for r in RULESET.rules}
    assert base["IMMUNE test - connect to port 4444"].output is False
    # ...while the chain keeps its rules alerting (generate: true).
    assert base["IMMUNE test - program run from a temporary directory"].output


def test_sigma_event_count_fires_once_at_the_threshold() -> None:
    events = [connect(i * 10) for i in range(7)]
    assert fired(events[:4]) == []
    engine = SigmaEngine(RULESET)
    titles = [fired([e], engine) for e in events]
    assert [i for i, t in enumerate(titles) if COUNT in t] == [4]


def test_sigma_event_count_forgets_events_outside_the_window() -> None:
    # Five events, but never five within 60 s.
    events = [connect(i * 16) for i in range(5)]
    assert COUNT not in fired(events)
    assert COUNT in fired([connect(i * 14) for i in range(5)])


def test_sigma_event_count_is_kept_per_group() -> None:
    events = [connect(i, agent=f"web-{i % 2}") for i in range(8)]
    assert COUNT not in fired(events)  # four per host
    engine = SigmaEngine(RULESET)
    found = [
        h
        for e in [*events, connect(9, "web-0")]
        for h in engine.evaluate(e).correlations
    ]
    counted = [h for h in found if h.rule.title == COUNT]
    assert len(counted) == 1
    assert counted[0].key == ("web-0.test",)
    assert len(counted[0].events) == 5
    assert {e.agent_id for e in counted[0].events} == {"web-0"}


def test_sigma_value_count_needs_distinct_values() -> None:
    same = [connect(i, addr="203.0.113.1") for i in range(3)]
    engine = SigmaEngine(RULESET)
    assert VALUES not in fired(same, engine)
    three = [connect(i, addr=f"203.0.113.{i}") for i in range(3)]
    assert VALUES in fired(three)


def test_sigma_temporal_ordered_needs_the_order() -> None:
    drop = ev(exe="/tmp/payload", ts=T0)
    read = ev("open", path="/etc/shadow", exe="/usr/bin/cat", ts=T0 + 30 * S)
    assert CHAIN in fired([drop, read])
    assert CHAIN not in fired([read, drop])  # wrong order
    late = ev("open", path="/etc/shadow", exe="/usr/bin/cat", ts=T0 + 200 * S)
    assert CHAIN not in fired([drop, late])  # beyond 2 minutes
    other_host = ev("open", agent="db-1", path="/etc/shadow", exe="/bin/cat", ts=T0)
    assert CHAIN not in fired([drop, other_host])


def test_sigma_temporal_any_order(tmp_path: Path) -> None:
    text = (
        (RULES / "correlations.yml")
        .read_text()
        .replace("type: temporal_ordered", "type: temporal")
    )
    (tmp_path / "c.yml").write_text(text)
    for name in ("exec_from_tmp.yml", "shadow_read.yml"):
        (tmp_path / name).write_text((RULES / name).read_text())
    ruleset = load_rules([tmp_path])
    drop = ev(exe="/tmp/payload", ts=T0 + 10 * S)
    read = ev("open", path="/etc/shadow", exe="/usr/bin/cat", ts=T0)
    engine = SigmaEngine(ruleset)
    titles = [
        h.rule.title for e in [read, drop] for h in engine.evaluate(e).correlations
    ]
    assert titles == [CHAIN]


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 50), st.integers(0, 600), st.integers(0, 20)),
        max_size=300,
    )
)
def test_sigma_correlation_state_stays_bounded(
    steps: list[tuple[int, int, int]],
) -> None:
    engine = SigmaEngine(RULESET, max_groups=16)
    for host, at, addr in sorted(steps, key=lambda s: s[1]):
        engine.evaluate(connect(at, agent=f"h{host}", addr=f"198.51.100.{addr}"))
        assert len(engine.correlator) <= 16
        for group in engine.correlator._groups.values():
            assert len(group.events) <= 5  # what the largest condition needs
    hosts = {h for h, _at, _a in steps}
    if len(hosts) > 16:
        assert engine.correlator.evicted > 0


def test_sigma_correlator_refuses_bad_bounds() -> None:
    with pytest.raises(ValueError, match="max_groups"):
        SigmaEngine(RULESET, max_groups=0)


def reference_fires(
    steps: list[tuple[int, int, int]], needed: int, span: int, distinct: bool
) -> list[int]:
    """Indexes of the events at which a count (or distinct count) fires.

    The reference keeps every event of each host and recounts from scratch:
    events since the host's last firing and no older than ``span``.
    """
    fires, since_fire = [], {}
    for index, (host, at, addr) in enumerate(steps):
        kept = [(t, a) for t, a in since_fire.get(host, []) if t >= at - span]
        kept.append((at, addr))
        count = len({a for _t, a in kept}) if distinct else len(kept)
        if count >= needed:
            fires.append(index)
            kept = []
        since_fire[host] = kept
    return fires


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 400), st.integers(0, 4)),
        max_size=60,
    ).map(lambda steps: sorted(steps, key=lambda s: s[1]))
)
def test_sigma_count_windows_agree_with_a_recounting_reference(
    steps: list[tuple[int, int, int]],
) -> None:
    engine = SigmaEngine(RULESET)
    counts, values = [], []
    for index, (host, at, addr) in enumerate(steps):
        event = connect(at, agent=f"h{host}", addr=f"198.51.100.{addr}")
        titles = [h.rule.title for h in engine.evaluate(event).correlations]
        if COUNT in titles:
            counts.append(index)
        if VALUES in titles:
            values.append(index)
    assert counts == reference_fires(steps, 5, 60, distinct=False)
    assert values == reference_fires(steps, 3, 300, distinct=True)
