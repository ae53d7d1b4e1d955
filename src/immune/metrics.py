"""Counters the hive and agents keep about themselves.

Counter names are dotted lower case (``events.received``,
``deadletters.not_json``). They are cheap enough to bump per event, and
``snapshot()`` hands a copy to the status display, heartbeats and the API.
"""

from __future__ import annotations

from collections import Counter


class Metrics:
    """A set of named, monotonically increasing counters and gauges."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.gauges: dict[str, float] = {}

    def inc(self, name: str, amount: int = 1) -> None:
        self.counters[name] += amount

    def set(self, name: str, value: float) -> None:
        self.gauges[name] = value

    def get(self, name: str) -> int:
        return self.counters[name]

    def snapshot(self) -> dict[str, float]:
        """All counters and gauges, as a plain dict."""
        merged: dict[str, float] = dict(self.counters)
        merged.update(self.gauges)
        return merged
