"""sigma: Sigma rules (detection and correlation) evaluated on every event.

Rules are read from the directories of ``[plugins.sigma] rule_dirs`` when
the hive starts, through pySigma and IMMUNE's field mapping (see
``docs/sigma.md``). A rule IMMUNE cannot evaluate is refused: logged with
its file, id, title and reason, counted in ``sigma.rules.refused``, and
listed by ``immune sigma check DIR``. A match raises an alert carrying the
rule's id and title, its level as severity and its ATT&CK tags as
techniques.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from immune.errors import PluginError
from immune.events import Event
from immune.hookspecs import hookimpl
from immune.safe import printable
from immune.sigma import CorrelationHit, DetectionRule, SigmaEngine, load_rules

if TYPE_CHECKING:
    from immune.hive import Hive

logger = logging.getLogger(__name__)

NAME = "sigma"


class Settings(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The ``[plugins.sigma]`` table, validated.

    Args:
        rule_dirs: directories (or files) of Sigma rules, read recursively.
        max_processes: processes remembered for the parent fields, >= 1.
        max_groups: correlation groups held at once, >= 1.
    """

    rule_dirs: list[str] = msgspec.field(default_factory=list)
    max_processes: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 65_536
    max_groups: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 10_000

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> Settings:
        """Validate a configuration table.

        Raises:
            PluginError: naming the key at fault, or a rule path that is missing.
        """
        try:
            settings = msgspec.convert(table, cls)
        except msgspec.ValidationError as exc:
            text, _, where = str(exc).partition(" - at `$.")
            name = f"[plugins.{NAME}]"
            if where:
                name += " " + where.rstrip("`")
            raise PluginError(NAME, f"{name}: {text}") from None
        for entry in settings.rule_dirs:
            if not Path(entry).exists():
                msg = (
                    f"[plugins.{NAME}] rule_dirs: {entry!r} does not exist "
                    "(paths are relative to the working directory)"
                )
                raise PluginError(NAME, msg)
        return settings


class SigmaPlugin:
    """Loads the configured Sigma rules and raises an alert for each match."""

    def __init__(self) -> None:
        self.settings = Settings()
        self.engine: SigmaEngine | None = None
        self.hits: dict[str, int] = {}
        self.hive: Hive | None = None

    @hookimpl
    def immune_describe(self) -> dict[str, str]:
        return {"description": "Sigma detection and correlation rules (pySigma)"}

    @hookimpl
    def immune_configure(self, hive: Hive, config: dict[str, Any]) -> None:
        self.settings = Settings.from_table(config)
        self.hive = hive

    @hookimpl
    def immune_subscriptions(self) -> list[tuple[str, Any]]:
        # Without rules there is nothing to do per event: cost the bus nothing.
        return [("event.#", self.check)] if self.settings.rule_dirs else []

    @hookimpl
    async def immune_start(self, hive: Hive) -> None:
        ruleset = await asyncio.to_thread(load_rules, self.settings.rule_dirs)
        self.engine = SigmaEngine(
            ruleset,
            max_processes=self.settings.max_processes,
            max_groups=self.settings.max_groups,
        )
        for refusal in ruleset.refused:
            logger.warning(
                "Refused Sigma rule %s (%s) of %s: %s.",
                refusal.rule_id or "-",
                printable(refusal.title or "untitled"),
                printable(refusal.file),
                printable(refusal.reason),
            )
        hive.metrics.set("sigma.rules.loaded", len(ruleset.rules))
        hive.metrics.set("sigma.correlations.loaded", len(ruleset.correlations))
        hive.metrics.inc("sigma.rules.refused", len(ruleset.refused))
        logger.info(
            "Loaded %d Sigma rules and %d correlations from %d files; refused %d.",
            len(ruleset.rules),
            len(ruleset.correlations),
            ruleset.files,
            len(ruleset.refused),
        )

    @hookimpl
    async def immune_stop(self, hive: Hive) -> None:
        await hive.store.put_state(NAME, "hits", self.hits)

    async def check(self, event: Event) -> None:
        """Evaluate one event; alert on each rule matched and correlation fired."""
        if self.engine is None or self.hive is None:
            return
        verdict = self.engine.evaluate(event)
        for rule in verdict.matched:
            self.hits[rule.id] = self.hits.get(rule.id, 0) + 1
            self.hive.metrics.inc("sigma.matches")
            if rule.output:
                await self._alert(rule, event)
        for hit in verdict.correlations:
            self.hive.metrics.inc("sigma.correlations.fired")
            if hit.rule.output:
                await self._correlation_alert(hit)
        if verdict.matched and self.engine.correlator.by_member:
            evicted = self.engine.correlator.evicted
            self.hive.metrics.set("sigma.correlations.evicted", evicted)

    async def _alert(self, rule: DetectionRule, event: Event) -> None:
        assert self.hive is not None
        data: dict[str, Any] = {
            "sigma_id": rule.id,
            "sigma_file": rule.file,
            "tags": list(rule.tags),
        }
        for name in ("pid", "ppid", "uid", "exe", "path", "addr", "port"):
            value = getattr(event, name)
            if value is not None:
                data[name] = value
        if event.argv:
            data["cmdline"] = event.cmdline[:1024]
        await self.hive.raise_alert(
            rule=rule.id,
            title=rule.title,
            severity=rule.severity,
            plugin=NAME,
            events=[event],
            techniques=rule.techniques,
            description=rule.description,
            data=data,
        )

    async def _correlation_alert(self, hit: CorrelationHit) -> None:
        assert self.hive is not None
        rule = hit.rule
        first_member = rule.rules[0]
        group = dict(zip(rule.group_by[first_member], hit.key, strict=True))
        await self.hive.raise_alert(
            rule=rule.id,
            title=rule.title,
            severity=rule.severity,
            plugin=NAME,
            events=hit.events,
            techniques=rule.techniques,
            description=rule.description,
            data={
                "sigma_id": rule.id,
                "sigma_file": rule.file,
                "correlation": rule.type,
                "group": group,
                "events": len(hit.events),
                "rules": list(rule.rules),
            },
        )
