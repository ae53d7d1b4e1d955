"""Alert hygiene: one attack, one alert that counts its events."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from immune import config as config_mod
from immune.dedup import Deduplicator
from immune.events import Alert, Event, new_id, now_ns
from immune.hive import Hive
from immune.storage import Store


def alert(rule: str = "r", agent: str = "web-1", **fields: Any) -> Alert:
    base: dict[str, Any] = {
        "id": new_id(),
        "ts": now_ns(),
        "rule": rule,
        "title": "t",
        "severity": "high",
        "plugin": "test",
        "agent_id": agent,
        "event_ids": [new_id()],
    }
    base.update(fields)
    return Alert(**base)


def event(agent: str = "web-1") -> Event:
    return Event(id=new_id(), agent_id=agent, host="h", ts=now_ns(), kind="exec")


def test_dedup_folds_repeats_within_the_window() -> None:
    dedup = Deduplicator(300)
    first, status = dedup.fold(alert())
    assert status == "new"
    again = alert()
    merged, status = dedup.fold(again)
    assert status == "updated" and merged.id == first.id
    assert merged.count == 2
    assert merged.event_ids == first.event_ids + again.event_ids
    assert merged.data["events_total"] == 2
    assert merged.data["last_seen_ns"] == again.ts


@pytest.mark.parametrize(
    "other",
    [
        {"rule": "other"},
        {"agent": "web-2"},
        {"severity": "critical"},
    ],
)
def test_dedup_keeps_apart_what_differs(other: dict[str, Any]) -> None:
    dedup = Deduplicator(300)
    dedup.fold(alert())
    assert dedup.fold(alert(**other))[1] == "new"


def test_dedup_key_keeps_indicators_apart() -> None:
    dedup = Deduplicator(300)
    assert dedup.fold(alert(), key="10.0.0.1")[1] == "new"
    assert dedup.fold(alert(), key="10.0.0.2")[1] == "new"
    assert dedup.fold(alert(), key="10.0.0.1")[1] == "updated"


def test_dedup_window_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    dedup = Deduplicator(60)
    first, _ = dedup.fold(alert())
    clock[0] += 59
    assert dedup.fold(alert())[1] == "updated"
    clock[0] += 2  # the window is fixed from the first sighting
    renewed, status = dedup.fold(alert())
    assert status == "new" and renewed.id != first.id and renewed.count == 1


def test_dedup_off_globally_and_per_rule() -> None:
    off = Deduplicator(0)
    assert [off.fold(alert())[1] for _ in range(3)] == ["new"] * 3
    some = Deduplicator(300, rule_windows={"noisy": 0})
    assert [some.fold(alert("noisy"))[1] for _ in range(2)] == ["new"] * 2
    assert [some.fold(alert("calm"))[1] for _ in range(2)] == ["new", "updated"]


def test_dedup_same_events_again_change_nothing() -> None:
    dedup = Deduplicator(300)
    first, _ = dedup.fold(alert())
    merged, status = dedup.fold(alert(event_ids=list(first.event_ids)))
    assert status == "same" and merged.count == 1


def test_dedup_caps_event_ids_but_counts_every_event() -> None:
    dedup = Deduplicator(300, max_event_ids=5)
    first, _ = dedup.fold(alert(event_ids=[new_id() for _ in range(7)]))
    assert len(first.event_ids) == 5 and first.data["events_total"] == 7
    for _ in range(10):
        merged, _ = dedup.fold(alert(event_ids=[new_id(), new_id()]))
    assert merged.count == 11
    assert merged.event_ids == first.event_ids
    assert merged.data["events_total"] == 27


def test_dedup_state_is_bounded() -> None:
    dedup = Deduplicator(300, max_keys=100)
    for number in range(1000):
        dedup.fold(alert(agent=f"a-{number}"))
    assert len(dedup) == 100


@given(st.lists(st.sampled_from(["a", "b", "c"]), max_size=60))
def test_dedup_one_alert_per_key_counts_each_raise(rules: list[str]) -> None:
    dedup = Deduplicator(300)
    last: dict[str, Alert] = {}
    for rule in rules:
        last[rule], _ = dedup.fold(alert(rule))
    assert {r: a.count for r, a in last.items()} == {
        r: rules.count(r) for r in set(rules)
    }
    assert len({a.id for a in last.values()}) == len(set(rules))


async def test_dedup_through_the_hive_stores_the_count(db_url: str) -> None:
    config = config_mod.load(environ={})
    config.hive.database = db_url
    config.storage.flush_interval = 0.01
    hive = Hive(config, discover=False)
    published: list[Alert] = []
    updates: list[Alert] = []
    hive.bus.subscribe("alert.#", published.append)
    hive.bus.subscribe("alert_update.#", updates.append)
    async with hive:
        events = [event() for _ in range(50)]
        for ev in events:
            await hive.raise_alert(
                rule="flood", title="t", severity="high", plugin="t", events=[ev]
            )
        await hive.bus.join()
        await hive.store.flush()
        (row,) = hive.store.alerts()
    assert len(published) == 1 and len(updates) == 49
    assert row["id"] == published[0].id and row["count"] == 50
    assert row["event_ids"] == [e.id for e in events]
    assert hive.metrics.get("alerts.raised") == 1
    assert hive.metrics.get("alerts.deduplicated") == 49
    hive.store.close()


async def test_dedup_older_copy_never_overwrites_a_newer_row(db_url: str) -> None:
    store = Store(db_url)
    store.upgrade()
    async with store:
        first = alert()
        newer = first.__class__(**{**_fields(first), "count": 3})
        await store.add_alert(newer)
        await store.flush()
        await store.add_alert(first)  # arrives late
        await store.flush()
        await store.add_alert(newer)
        await store.add_alert(first)  # both pending at once
        await store.flush()
        (row,) = store.alerts()
    assert row["count"] == 3


def _fields(a: Alert) -> dict[str, Any]:
    return {f: getattr(a, f) for f in a.__struct_fields__}
