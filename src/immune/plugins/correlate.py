"""correlate: detections over many events and alerts, in time windows.

Runs the ``correlations:`` of the rule files (threshold, distinct-count and
ordered-sequence; see ``immune.rules.correlation`` and ``docs/rules.md``).
Shipped: lateral movement, exfiltration, and the reverse-shell and
credential-harvesting chains. Each raises one alert with the events (and
alerts) behind it; ``alert.data`` holds the key, count, agents and hosts.

Configuration (``[plugins.correlate]``)::

    paths = []            # rule files and directories; default: the rules plugin's
    defaults = true       # load the shipped correlations
    poll_interval = 2.0   # seconds between checks for changed files; 0: never
    max_keys = 10000      # keys of state kept per correlation, at most

Counters: ``correlate.fired``, ``correlate.evicted`` (keys dropped for the
cap), ``correlate.expired``, ``correlate.suppressed`` (matches while a key is
quiet after firing), ``correlate.late``, ``correlate.unkeyed``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from immune.events import Alert, Event, now_ns
from immune.hookspecs import hookimpl
from immune.rules.correlation import Correlator, Finding, Item, finding_alert
from immune.rules.ruleset import RuleSet
from immune.rules.source import RuleSource, check_settings

if TYPE_CHECKING:
    from immune.hive import Hive

logger = logging.getLogger(__name__)

SETTINGS = {"paths", "defaults", "poll_interval", "max_keys"}


class CorrelatePlugin:
    """Feeds events and alerts to the correlations; raises what they find."""

    def __init__(self) -> None:
        self.source = RuleSource([])
        self.correlator = Correlator({})
        self.poll_interval = 2.0
        self.max_keys: int | None = None

    @hookimpl
    def immune_describe(self) -> dict[str, str]:
        return {"description": "threshold, distinct-count and sequence correlation"}

    @hookimpl
    def immune_configure(self, hive: Hive, config: dict[str, Any]) -> None:
        check_settings(config, SETTINGS)
        max_keys = config.get("max_keys")
        if max_keys is not None and (not isinstance(max_keys, int) or max_keys < 1):
            raise ValueError("max_keys must be a whole number of at least 1")
        self.hive = hive
        self.max_keys = max_keys
        self.poll_interval = float(config.get("poll_interval", 2.0))
        paths = config.get("paths")
        if paths is None:
            paths = hive.config.plugins.get("rules", {}).get("paths", [])
        self.source = RuleSource(
            paths,
            defaults=config.get("defaults", True),
            metrics=hive.metrics,
            prefix="correlate",
        )
        self.use(self.source.load())

    def use(self, ruleset: RuleSet) -> None:
        """Run the correlations of a new rule set, keeping the state of those
        that did not change their id, type or stages."""
        new = Correlator(
            ruleset.correlations, metrics=self.hive.metrics, max_keys=self.max_keys
        )
        old = self.correlator
        for corr in new.correlations:
            before = next((c for c in old.correlations if c.id == corr.id), None)
            if before is not None and (before.type, len(before.filters)) == (
                corr.type,
                len(corr.filters),
            ):
                new.states[corr.id] = old.states[corr.id]
                new.now[corr.id] = old.now[corr.id]
        self.correlator = new

    @hookimpl
    def immune_subscriptions(self) -> list[tuple[str, Any]]:
        return [
            ("event.#", self.feed),
            ("alert.#", self.feed),
            ("rules.reload", self.on_reload),
        ]

    @hookimpl
    def immune_start(self, hive: Hive) -> None:
        if self.poll_interval > 0:
            watch = self.source.watch(self.poll_interval, hive.stopping, self.use)
            hive.create_task(watch, name="correlate-watch")

    async def on_reload(self, _message: Any) -> None:
        """Reload the rule files now (anything published on ``rules.reload``)."""
        self.use(await asyncio.to_thread(self.source.load))

    def feed(self, item: Item) -> Awaitable[None] | None:
        """Give an event or an alert to the correlations; raise what fires.

        Returns None when nothing fired (nearly always), else the coroutine
        publishing the alerts, which the bus awaits.
        """
        if not isinstance(item, Event | Alert):
            self.hive.metrics.inc("correlate.ignored")
            return None
        findings = self.correlator.feed(item)
        return self._raise(findings) if findings else None

    async def _raise(self, findings: list[Finding]) -> None:
        for finding in findings:
            alert = finding_alert(finding, ts=now_ns())
            self.hive.metrics.inc("correlate.fired")
            # Built here rather than by hive.raise_alert, which takes events
            # only: a correlation of alerts must carry their event ids too.
            self.hive.metrics.inc("alerts.raised")
            logger.debug("Correlation %s fired for %s.", alert.rule, finding.key_text)
            await self.hive.bus.publish(alert.topic, alert, key=alert.agent_id)
