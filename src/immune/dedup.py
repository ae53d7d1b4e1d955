"""Alert de-duplication: one attack, one alert that counts what it saw.

An alert raised again with the same rule, severity, agent and key within the
suppression window is not a new alert: the first one's ``count`` grows, the
new events' ids join its ``event_ids`` (up to a cap; ``data["events_total"]``
keeps counting past it), and ``data["last_seen_ns"]`` moves on. The updated
alert is stored again under its id, which updates its row, and published on
``alert_update.<severity>`` rather than ``alert.<severity>``, so that alert
channels and playbooks are not flooded. Events already in the alert (a
transport redelivering a batch) change nothing.

The window is fixed from the alert's first sighting: a long attack gives one
alert per window, not one alert forever. State is bounded: past
``max_keys`` open alerts the oldest are forgotten.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping

import msgspec

from immune.events import Alert

Key = tuple[str, str, str, str]


class _Open:
    """An alert within its window, and the event ids it holds."""

    __slots__ = ("alert", "deadline", "seen")

    def __init__(self, alert: Alert, deadline: float) -> None:
        self.alert = alert
        self.deadline = deadline
        self.seen = set(alert.event_ids)


class Deduplicator:
    """Folds repeated alerts into the first one of their window.

    Args:
        window_s: the suppression window in seconds; 0 turns it off.
        max_event_ids: the most event ids one alert keeps.
        rule_windows: windows for some rules, overriding ``window_s``
            (0 turns de-duplication off for that rule).
        max_keys: the most alerts held open at once.
    """

    def __init__(
        self,
        window_s: float = 300.0,
        *,
        max_event_ids: int = 100,
        rule_windows: Mapping[str, float] | None = None,
        max_keys: int = 10_000,
    ) -> None:
        self.window_s = window_s
        self.max_event_ids = max_event_ids
        self.rule_windows = dict(rule_windows or {})
        self.max_keys = max_keys
        self._open: OrderedDict[Key, _Open] = OrderedDict()

    def fold(self, alert: Alert, key: str | None = None) -> tuple[Alert, str]:
        """The alert to publish, and what it is.

        Returns ``(alert, "new")`` for an alert opening a window,
        ``(earlier, "updated")`` with the earlier alert updated by this one,
        or ``(earlier, "same")`` when this one brings no new event.
        """
        window = self.rule_windows.get(alert.rule, self.window_s)
        if window <= 0:
            return alert, "new"
        now = time.monotonic()
        where = alert.agent_id or alert.host or ""
        ident = (alert.rule, alert.severity, where, key or "")
        held = self._open.get(ident)
        if held is None or now >= held.deadline:
            self._remember(ident, _Open(self._capped(alert), now + window))
            return self._open[ident].alert, "new"
        merged = self._merge(held, alert)
        if merged is held.alert:
            return merged, "same"
        held.alert = merged
        return merged, "updated"

    def _remember(self, ident: Key, held: _Open) -> None:
        self._open.pop(ident, None)
        self._open[ident] = held
        while len(self._open) > self.max_keys:
            self._open.popitem(last=False)

    def _capped(self, alert: Alert) -> Alert:
        ids = alert.event_ids
        if len(ids) <= self.max_event_ids:
            return alert
        data = {**alert.data, "events_total": len(ids)}
        return msgspec.structs.replace(
            alert, event_ids=ids[: self.max_event_ids], data=data
        )

    def _merge(self, held: _Open, alert: Alert) -> Alert:
        first = held.alert
        fresh = [i for i in alert.event_ids if i not in held.seen]
        if alert.event_ids and not fresh:
            return first  # the same events again: nothing new happened
        room = self.max_event_ids - len(first.event_ids)
        kept = fresh[: max(room, 0)]
        # Remember ids past the cap too, so a redelivery is not counted
        # again, within bounds.
        if len(held.seen) < 10 * self.max_event_ids:
            held.seen.update(fresh)
        total = first.data.get("events_total", len(first.event_ids)) + len(fresh)
        data = {**first.data, "events_total": total, "last_seen_ns": alert.ts}
        return msgspec.structs.replace(
            first,
            count=first.count + 1,
            event_ids=first.event_ids + kept,
            data=data,
        )

    def __len__(self) -> int:
        return len(self._open)
