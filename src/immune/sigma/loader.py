"""Loading Sigma rule files into a rule set IMMUNE can evaluate.

Each file is parsed by pySigma on its own, so that one broken file does not
hide the others. Each rule then goes through the field pipeline
(:func:`immune.sigma.fields.pipeline`) and the compiler. Whatever cannot be
evaluated on IMMUNE's events is *refused*: kept in the rule set's
``refused`` list with its file, id, title and the reason, never dropped
without a word. The rules that load are indexed by the event kinds they
apply to.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from sigma.collection import SigmaCollection
from sigma.correlations import SigmaCorrelationRule
from sigma.exceptions import SigmaError, SigmaRuleLocation
from sigma.processing.pipeline import ProcessingPipeline
from sigma.rule import SigmaRule

from immune.errors import ImmuneError
from immune.events import HOST_KINDS, Severity
from immune.sigma.compiler import Node, Predicate, compile_rule
from immune.sigma.fields import (
    CATEGORY_KINDS,
    SERVICES,
    Subject,
    pipeline,
)
from immune.sigma.text import UnsupportedError

if TYPE_CHECKING:
    from immune.sigma.correlation import CorrelationRule

logger = logging.getLogger(__name__)

LEVEL_SEVERITY: dict[str, Severity] = {
    "informational": "info",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "critical": "critical",
}
_TECHNIQUE = re.compile(r"^t\d{4}(?:\.\d{3})?$")


class SigmaLoadError(ImmuneError):
    """A rule path cannot be read at all (it does not exist)."""


@dataclass(frozen=True)
class Refusal:
    """A rule (or a whole file) IMMUNE does not evaluate, and why.

    Args:
        file: the rule file.
        rule_id: the rule's id, or None when the file itself is unusable.
        title: the rule's title, when known.
        reason: for a person, naming what is not supported.
    """

    file: str
    rule_id: str | None
    title: str | None
    reason: str


@dataclass
class DetectionRule:
    """A Sigma detection rule, compiled.

    Args:
        output: whether a match raises an alert by itself; False for rules
            that only feed a correlation (``generate: false``).
        notes: parts of the rule that can never match on IMMUNE events.
    """

    id: str
    title: str
    file: str
    severity: Severity
    techniques: tuple[str, ...]
    tags: tuple[str, ...]
    description: str
    nodes: dict[str, Node]
    source: str
    output: bool = True
    name: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The event kinds the rule can match."""
        return tuple(self.nodes)

    def matches(self, subject: Subject) -> bool:
        """Whether the event under evaluation matches the rule."""
        node = self.nodes.get(subject.event.kind, False)
        return node(subject) if not isinstance(node, bool) else node


@dataclass
class RuleSet:
    """What a set of rule paths gave: rules to run, and refusals with reasons."""

    rules: list[DetectionRule] = field(default_factory=list)
    correlations: list[CorrelationRule] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    files: int = 0

    def by_kind(self) -> dict[str, list[tuple[DetectionRule, Predicate]]]:
        """For each event kind, the rules that apply with their predicate for it."""
        index: dict[str, list[tuple[DetectionRule, Predicate]]] = {}
        for rule in self.rules:
            for kind, node in rule.nodes.items():
                if not isinstance(node, bool):
                    index.setdefault(kind, []).append((rule, node))
        return index


def rule_files(paths: Iterable[str | Path]) -> list[Path]:
    """The ``.yml`` and ``.yaml`` files of the given files and directories.

    Raises:
        SigmaLoadError: a path does not exist.
    """
    files: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            found = [*path.rglob("*.yml"), *path.rglob("*.yaml")]
            files.extend(sorted(p for p in found if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            msg = f"Sigma rule path {str(path)!r} does not exist"
            raise SigmaLoadError(msg)
    return files


def load_rules(paths: Iterable[str | Path]) -> RuleSet:
    """Load, map and compile every rule under the given files and directories.

    Raises:
        SigmaLoadError: a path does not exist. Problems with files and rules
            are refusals in the result, not exceptions.
    """
    from immune.sigma.correlation import compile_correlation

    result = RuleSet()
    collections: list[SigmaCollection] = []
    for path in rule_files(paths):
        result.files += 1
        collection = _parse_file(path, result)
        if collection is not None:
            collections.append(collection)
    merged = SigmaCollection.merge(collections, resolve_references=False)
    # References first: they tell the rules that only feed a correlation.
    unresolved = _resolve_references(merged)

    compiled: dict[int, DetectionRule] = {}
    mapper = pipeline()
    for rule in merged.rules:
        if isinstance(rule, SigmaRule):
            loaded = _load_rule(rule, mapper, result)
            if loaded is not None:
                compiled[id(rule)] = loaded
    result.rules = list(compiled.values())
    _check_unique(result)

    for rule in merged.rules:
        if not isinstance(rule, SigmaCorrelationRule):
            continue
        if id(rule) in unresolved:
            result.refused.append(_refusal(rule, unresolved[id(rule)]))
            continue
        try:
            result.correlations.append(compile_correlation(rule, compiled))
        except UnsupportedError as exc:
            result.refused.append(_refusal(rule, str(exc)))
    return result


def _resolve_references(merged: SigmaCollection) -> dict[int, str]:
    """Resolve each correlation's rules; the reason for those that cannot be."""
    unresolved: dict[int, str] = {}
    for rule in merged.rules:
        if isinstance(rule, SigmaCorrelationRule):
            try:
                rule.resolve_rule_references(merged)
            except SigmaError as exc:
                unresolved[id(rule)] = f"cannot resolve its rules: {_message(exc)}"
    return unresolved


def _parse_file(path: Path, result: RuleSet) -> SigmaCollection | None:
    try:
        text = path.read_text(encoding="utf-8")
        collection = SigmaCollection.from_yaml(
            text,
            collect_errors=True,
            source=SigmaRuleLocation(path),
            resolve_references=False,
        )
    except (OSError, UnicodeDecodeError, yaml.YAMLError, SigmaError) as exc:
        reason = f"cannot be read as Sigma rules: {_message(exc)}"
        result.refused.append(Refusal(str(path), None, None, reason))
        return None
    of_rules = {id(error) for rule in collection.rules for error in rule.errors}
    for error in collection.errors:
        if id(error) not in of_rules:
            result.refused.append(Refusal(str(path), None, None, _message(error)))
    good = []
    for rule in collection.rules:
        if rule.errors:
            reason = "; ".join(_message(error) for error in rule.errors)
            result.refused.append(_refusal(rule, reason, path))
        else:
            good.append(rule)
    collection.rules = good
    return collection


def _load_rule(
    rule: SigmaRule, mapper: ProcessingPipeline, result: RuleSet
) -> DetectionRule | None:
    source, kinds, why = _source_of(rule)
    if source is None:
        result.refused.append(_refusal(rule, why))
        return None
    try:
        mapper.apply(rule)
        nodes, notes = _compile_kinds(rule, kinds)
    except (SigmaError, UnsupportedError) as exc:
        result.refused.append(_refusal(rule, _message(exc)))
        return None
    always = [kind for kind, node in nodes.items() if node is True]
    if always:
        reason = f"would match every {' and every '.join(always)} event"
        result.refused.append(_refusal(rule, reason))
        return None
    if not nodes:
        why = "; ".join(notes) or (
            f"the fields it tests never occur on {', '.join(kinds)} events"
        )
        result.refused.append(_refusal(rule, f"can never match IMMUNE events: {why}"))
        return None
    return _detection(rule, source, nodes, notes)


def _compile_kinds(
    rule: SigmaRule, kinds: tuple[str, ...]
) -> tuple[dict[str, Node], list[str]]:
    """The rule compiled for each kind it could match, with its notes."""
    nodes: dict[str, Node] = {}
    notes: dict[str, None] = {}
    for kind in kinds:
        compiled = compile_rule(rule, kind)
        notes.update(dict.fromkeys(compiled.notes))
        if compiled.node is not False:
            nodes[kind] = compiled.node
    return nodes, list(notes)


def _source_of(rule: SigmaRule) -> tuple[str | None, tuple[str, ...], str]:
    """The log source of the rule as IMMUNE knows it, with its event kinds."""
    logsource = rule.logsource
    product, category, service = (
        logsource.product,
        logsource.category,
        logsource.service,
    )
    if product not in (None, "linux"):
        return None, (), f"product {product!r}: IMMUNE's agents report Linux events"
    if category in CATEGORY_KINDS and service is None:
        return category, CATEGORY_KINDS[category], ""
    if service in SERVICES and category is None:
        return service, HOST_KINDS, ""
    known = ", ".join([*CATEGORY_KINDS, *(f"service {s}" for s in SERVICES)])
    parts = [f"{k}={v}" for k, v in (("category", category), ("service", service)) if v]
    described = ", ".join(parts) or "no category or service (system logs)"
    why = f"log source {described}: IMMUNE has no such events (it has {known})"
    return None, (), why


def _detection(
    rule: SigmaRule, source: str, nodes: dict[str, Node], notes: list[str]
) -> DetectionRule:
    level = str(rule.level) if rule.level is not None else "medium"
    return DetectionRule(
        id=rule_id(rule),
        title=rule.title or rule_id(rule),
        file=_file(rule),
        severity=LEVEL_SEVERITY.get(level, "medium"),
        techniques=techniques(str(tag) for tag in rule.tags),
        tags=tuple(str(tag) for tag in rule.tags),
        description=(rule.description or "").strip(),
        nodes=nodes,
        source=source,
        # pySigma's only record of a correlation's `generate: false`.
        output=rule._output,
        name=rule.name,
        notes=notes,
    )


def techniques(tags: Iterable[str]) -> tuple[str, ...]:
    """ATT&CK technique ids from Sigma tags: ``attack.t1059.004`` -> ``T1059.004``."""
    found = []
    for tag in tags:
        namespace, _, name = tag.partition(".")
        if namespace == "attack" and _TECHNIQUE.match(name.lower()):
            found.append(name.upper())
    return tuple(found)


def rule_id(rule: SigmaRule | SigmaCorrelationRule) -> str:
    """The rule's id, else its name, else its file's name."""
    if rule.id is not None:
        return str(rule.id)
    if rule.name:
        return rule.name
    return Path(_file(rule)).stem


def _file(rule: SigmaRule | SigmaCorrelationRule, path: Path | None = None) -> str:
    if path is not None:
        return str(path)
    source = rule.source
    return str(source.path) if source is not None and source.path else "?"


def _refusal(
    rule: SigmaRule | SigmaCorrelationRule, reason: str, path: Path | None = None
) -> Refusal:
    return Refusal(_file(rule, path), rule_id(rule), rule.title or None, reason)


def _message(exc: BaseException) -> str:
    # pySigma appends " in <file>" to its messages; the refusal names the file.
    text = str(exc.args[0]) if isinstance(exc, SigmaError) and exc.args else str(exc)
    # RE2 reports in bytes: b'invalid perl operator: (?='.
    text = re.sub(r"\bb'(.*?)'$", r"\1", text)
    return " ".join(text.split()) or type(exc).__name__


def _check_unique(result: RuleSet) -> None:
    seen: dict[str, str] = {}
    kept = []
    for rule in result.rules:
        if rule.id in seen:
            reason = f"id {rule.id} is already used by {seen[rule.id]}"
            result.refused.append(Refusal(rule.file, rule.id, rule.title, reason))
            continue
        seen[rule.id] = rule.file
        kept.append(rule)
    result.rules = kept
