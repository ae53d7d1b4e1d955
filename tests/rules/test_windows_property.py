"""Windows, by property: nothing outside a window counts, state stays bounded,
and on ordered streams a correlation fires exactly when a brute force says."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from immune.metrics import Metrics
from immune.rules import Correlator

from .helpers import NS, ev, ruleset


def threshold(count: int, window: int, max_keys: int = 10_000) -> str:
    return f"""\
correlations:
  - id: c
    type: threshold
    key: agent
    count: {count}
    window: {window}
    max_keys: {max_keys}
    match: {{condition: {{kind: connect}}}}
"""


def distinct(count: int, window: int) -> str:
    return f"""\
correlations:
  - id: c
    type: distinct
    key: agent
    distinct: port
    count: {count}
    window: {window}
    match: {{condition: {{kind: connect}}}}
"""


def sequence(stages: int, window: int) -> str:
    body = "".join(
        f"      - {{condition: {{kind: connect, port: {n}}}}}\n" for n in range(stages)
    )
    return f"""\
correlations:
  - id: c
    type: sequence
    key: agent
    window: {window}
    stages:
{body}"""


# (agent, seconds, port); ordered streams add up gaps, others take any times.
ITEM = st.tuples(st.sampled_from("abc"), st.integers(0, 400), st.integers(0, 3))
STREAM = st.lists(ITEM, max_size=40)


def events(stream, ordered: bool):
    out, now = [], 0
    for agent, seconds, port in stream:
        now = now + seconds // 20 if ordered else seconds
        out.append(ev("connect", agent=agent, at=now, port=port, addr="192.0.2.1"))
    return out


def feed(text, items, max_keys=None):
    correlator = Correlator(
        ruleset(text).correlations, metrics=Metrics(), max_keys=max_keys
    )
    found = []
    for item in items:
        for finding in correlator.feed(item):
            found.append((item, finding))
        assert correlator.keys("c") <= (max_keys or 10_000)
    return found


def spans_within(finding, window_s):
    times = [i.ts for i in finding.items]
    return max(times) - min(times) <= window_s * NS


@given(STREAM, st.booleans(), st.integers(1, 5), st.integers(1, 30))
def test_threshold_never_counts_outside_the_window(stream, ordered, count, window):
    for _, finding in feed(threshold(count, window), events(stream, ordered)):
        assert len(finding.items) == count
        assert spans_within(finding, window)
        assert len({i.agent_id for i in finding.items}) == 1
        assert len({i.id for i in finding.items}) == count


@given(STREAM, st.booleans(), st.integers(1, 4), st.integers(1, 30))
def test_distinct_never_counts_outside_the_window(stream, ordered, count, window):
    for _, finding in feed(distinct(count, window), events(stream, ordered)):
        assert len({i.port for i in finding.items}) == count
        assert spans_within(finding, window)


@given(STREAM, st.booleans(), st.integers(2, 3), st.integers(1, 30))
def test_sequence_never_counts_outside_the_window(stream, ordered, stages, window):
    for _, finding in feed(sequence(stages, window), events(stream, ordered)):
        assert [i.port for i in finding.items] == list(range(stages))
        times = [i.ts for i in finding.items]
        assert times == sorted(times)
        assert spans_within(finding, window)


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 400)), max_size=60))
def test_state_stays_bounded(items):
    stream = [
        ev("connect", agent=f"k{key}", at=at, port=1, addr="192.0.2.1")
        for key, at in sorted(items, key=lambda pair: pair[1])
    ]
    feed(threshold(3, 10), stream, max_keys=7)  # feed() checks the bound


def first_fire_threshold(items, count, window):
    """Brute force: the first item at which `count` items of one agent lie
    within `window` seconds, on an ordered stream."""
    for index, item in enumerate(items):
        same = [i for i in items[: index + 1] if i.agent_id == item.agent_id]
        recent = [i for i in same if item.ts - i.ts <= window * NS]
        if len(recent) >= count:
            return item
    return None


def first_fire_sequence(items, stages, window):
    for index, item in enumerate(items):
        same = [i for i in items[: index + 1] if i.agent_id == item.agent_id]
        if item.port != stages - 1:
            continue
        for combo in itertools.combinations(range(len(same) - 1), stages - 1):
            chosen = [same[c] for c in combo] + [item]
            if [c.port for c in chosen] == list(range(stages)) and (
                item.ts - chosen[0].ts <= window * NS
            ):
                return item
    return None


@settings(max_examples=150)
@given(STREAM, st.integers(1, 4), st.integers(1, 30))
def test_threshold_fires_when_brute_force_says(stream, count, window):
    items = events(stream, ordered=True)
    found = feed(threshold(count, window), items)
    expected = first_fire_threshold(items, count, window)
    assert (found[0][0] if found else None) is expected


@settings(max_examples=150)
@given(st.lists(ITEM, max_size=14), st.integers(2, 3), st.integers(1, 30))
def test_sequence_fires_when_brute_force_says(stream, stages, window):
    items = events(stream, ordered=True)
    found = feed(sequence(stages, window), items)
    expected = first_fire_sequence(items, stages, window)
    assert (found[0][0] if found else None) is expected
