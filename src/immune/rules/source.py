"""Rule files that reload when they change, for the plugins that run them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from immune.hive import wait_unless
from immune.metrics import Metrics
from immune.rules.errors import RuleError
from immune.rules.ruleset import DEFAULT_DIR, RuleSet, load_rules, rule_files

logger = logging.getLogger(__name__)


class RuleSource:
    """The rule set from some files, reloaded on change or on demand.

    A file that is refused on reload is reported (logged and counted in
    ``<prefix>.refused``) and its previous version stays in force, so the
    rules that were running keep running.

    Args:
        paths: rule files and directories, after the defaults.
        defaults: load the shipped default rules first.
        metrics: the hive's counters.
        prefix: the counters' prefix (the plugin's name).
    """

    def __init__(
        self,
        paths: Iterable[str],
        *,
        defaults: bool = True,
        metrics: Metrics | None = None,
        prefix: str = "rules",
    ) -> None:
        self.paths = [str(p) for p in paths]
        self.defaults = defaults
        self.metrics = metrics or Metrics()
        self.prefix = prefix
        self.ruleset = RuleSet()
        self.signature: tuple[Any, ...] = ()
        self.errors: list[RuleError] = []

    def load(self) -> RuleSet:
        """Read the files now; return the new rule set (also kept)."""
        signature = self._signature()
        ruleset = load_rules(
            self.paths,
            strict=False,
            defaults=self.defaults,
            fallback=self.ruleset.texts,
        )
        self.errors = ruleset.errors
        for error in ruleset.errors:
            self.metrics.inc(f"{self.prefix}.refused")
            logger.error("Rule file refused: %s.", error)
        self.ruleset, self.signature = ruleset, signature
        self.metrics.inc(f"{self.prefix}.reloads")
        self.metrics.set(f"{self.prefix}.rules", len(ruleset.rules))
        self.metrics.set(f"{self.prefix}.correlations", len(ruleset.correlations))
        # Both the rules and the correlate plugins load the files: say which.
        logger.info(
            "%s: loaded %d rules and %d correlations from %d files.",
            self.prefix,
            len(ruleset.rules),
            len(ruleset.correlations),
            len(ruleset.texts),
        )
        return ruleset

    def changed(self) -> bool:
        """Whether a file was added, removed or modified since the last load."""
        return self._signature() != self.signature

    def _signature(self) -> tuple[Any, ...]:
        items: list[Any] = []
        for root in ([str(DEFAULT_DIR)] if self.defaults else []) + self.paths:
            try:
                files = rule_files([root])
            except RuleError:
                items.append((root, None))
                continue
            for path in files:
                items.append(_stat(path))
        return tuple(items)

    async def watch(
        self,
        interval: float,
        stopping: asyncio.Event,
        on_change: Callable[[RuleSet], Awaitable[None] | None],
    ) -> None:
        """Poll the files every ``interval`` seconds until ``stopping`` is set."""
        while await wait_unless(stopping, interval):
            if await asyncio.to_thread(self.changed):
                logger.info("Rule files changed; reloading.")
                ruleset = await asyncio.to_thread(self.load)
                result = on_change(ruleset)
                if result is not None:
                    await result


def _stat(path: Path) -> tuple[str, int, int]:
    try:
        stat = path.stat()
    except OSError:
        return (str(path), -1, -1)
    return (str(path), stat.st_mtime_ns, stat.st_size)


def check_settings(config: dict[str, Any], allowed: set[str]) -> None:
    """Refuse unknown or mistyped plugin settings.

    Raises:
        ValueError: naming the setting.
    """
    unknown = set(config) - allowed
    if unknown:
        raise ValueError(
            f"unknown settings {sorted(unknown)}; known: {sorted(allowed)}"
        )
    paths = config.get("paths", [])
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ValueError("paths must be a list of files or directories")
    if not isinstance(config.get("defaults", True), bool):
        raise ValueError("defaults must be true or false")
    interval = config.get("poll_interval", 2.0)
    if (
        isinstance(interval, bool)
        or not isinstance(interval, int | float)
        or interval < 0
    ):
        raise ValueError("poll_interval must be a number of seconds, 0 to disable")
