"""Helpers shared by the sensor tests (imported by them, not a plugin)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import pytest

from immune.agent.sensors import Sensor, SensorUnavailableError
from immune.events import Event


class EventCollector:
    """Gathers events from a sensor's thread; waits for one that matches."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._cond = threading.Condition()

    def __call__(self, event: Event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_for(self, match: Callable[[Event], bool], timeout: float = 5.0) -> Event:
        with self._cond:
            found = self._cond.wait_for(
                lambda: next((e for e in self.events if match(e)), None), timeout
            )
        seen = [(e.kind, e.pid) for e in self.events[-20:]]
        assert found, f"no match among {len(self.events)} events; last: {seen}"
        return found


def open_or_skip(sensor: Sensor) -> None:
    """Open a kernel sensor, or skip with its reason (fail in CI).

    The reason names what is missing ("needs root ...", "tracefs is not
    mounted ..."); under IMMUNE_REQUIRE_SERVICES=1 a missing piece fails.
    """
    try:
        sensor.open()
    except SensorUnavailableError as exc:
        if os.environ.get("IMMUNE_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{exc} (IMMUNE_REQUIRE_SERVICES=1)")
        pytest.skip(str(exc))
