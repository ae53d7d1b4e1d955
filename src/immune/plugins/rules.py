"""rules: detection rules in YAML, run on every event.

Configuration (``[plugins.rules]``)::

    paths = ["/etc/immune/rules"]   # rule files and directories, after the defaults
    defaults = true                 # load the shipped rules (immune/rules/default)
    poll_interval = 2.0             # seconds between checks for changed files; 0: never
    disable = ["ssh-key-read"]      # rule ids not to raise alerts for

Rules reload without a restart when a file changes, and on demand when
anything is published on ``rules.reload``. A refused file is logged with its
file, line and reason and counted (``rules.refused``); the rules that were
running keep running. See ``docs/rules.md``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from immune.events import Event
from immune.hookspecs import hookimpl
from immune.rules.ruleset import Rule, RuleSet, alert_key, event_context
from immune.rules.source import RuleSource, check_settings

if TYPE_CHECKING:
    from immune.hive import Hive

logger = logging.getLogger(__name__)

SETTINGS = {"paths", "defaults", "poll_interval", "disable"}


class RulesPlugin:
    """Matches the rule set on events and raises one alert per rule matched."""

    def __init__(self) -> None:
        self.source = RuleSource([])
        self.disabled: set[str] = set()
        self.poll_interval = 2.0

    @property
    def ruleset(self) -> RuleSet:
        return self.source.ruleset

    @hookimpl
    def immune_describe(self) -> dict[str, str]:
        return {"description": "detection rules in YAML, reloaded on change"}

    @hookimpl
    def immune_configure(self, hive: Hive, config: dict[str, Any]) -> None:
        check_settings(config, SETTINGS)
        disable = config.get("disable", [])
        if not isinstance(disable, list):
            raise ValueError("disable must be a list of rule ids")
        self.hive = hive
        self.disabled = set(disable)
        self.poll_interval = float(config.get("poll_interval", 2.0))
        self.source = RuleSource(
            config.get("paths", []),
            defaults=config.get("defaults", True),
            metrics=hive.metrics,
            prefix="rules",
        )
        self.source.load()
        unknown = self.disabled - set(self.ruleset.rules)
        if unknown:
            logger.warning("Disabled rules not found: %s.", ", ".join(sorted(unknown)))

    @hookimpl
    def immune_subscriptions(self) -> list[tuple[str, Any]]:
        return [("event.#", self.check), ("rules.reload", self.on_reload)]

    @hookimpl
    def immune_start(self, hive: Hive) -> None:
        if self.poll_interval > 0:
            watch = self.source.watch(self.poll_interval, hive.stopping, _ignore)
            hive.create_task(watch, name="rules-watch")

    async def on_reload(self, _message: Any) -> None:
        """Reload the rule files now (anything published on ``rules.reload``)."""
        await asyncio.to_thread(self.source.load)

    def check(self, event: Event) -> Awaitable[None] | None:
        """Raise an alert for each enabled rule the event matches.

        Returns None when no rule matched (nearly always), else the coroutine
        raising the alerts, which the bus awaits: a miss costs no coroutine.
        """
        disabled = self.disabled
        hits = [
            rule
            for rule in self.ruleset.for_kind(event.kind)
            if rule.matches_indexed(event) and rule.id not in disabled
        ]
        return self._raise(event, hits) if hits else None

    async def _raise(self, event: Event, rules: list[Rule]) -> None:
        for rule in rules:
            self.hive.metrics.inc("rules.hits")
            data = event_context(event)
            if rule.file:
                data["rule_file"] = rule.file
            await self.hive.raise_alert(
                rule=rule.id,
                title=rule.title,
                severity=rule.severity,
                plugin="rules",
                events=[event],
                techniques=rule.techniques,
                description=rule.description,
                data=data,
                key=alert_key(event),
            )


def _ignore(_ruleset: RuleSet) -> None:
    return None
