"""Running a Sigma rule set on a stream of events.

The engine keeps what evaluation needs besides the rules: the process table
that gives the parent fields, and the state of the correlation rules. It is
plain Python with no hive in it, so the plugin, the CLI and the benchmark
share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import re2

from immune.events import Event
from immune.sigma.compiler import Predicate, required_leaf
from immune.sigma.correlation import CorrelationHit, CorrelationRule, Correlator
from immune.sigma.fields import ProcessTable, Subject
from immune.sigma.loader import DetectionRule, RuleSet
from immune.sigma.text import as_text, utf8

Entry = tuple[DetectionRule, Predicate]


class KindIndex:
    """The rules of one event kind, with a pre-filter per field.

    A rule that cannot match unless one plain text test holds (its
    ``Image|endswith`` list, say) joins the RE2 set of that field; one set
    search per field then names the few rules worth evaluating, whatever
    the number of rules. The others are evaluated on every event.

    Args:
        entries: the rules of the kind with their predicate for it.
    """

    def __init__(self, entries: list[Entry]) -> None:
        self.entries = entries
        self.always: list[int] = []
        fields: dict[tuple[str, bool], tuple[re2.Set, list[int]]] = {}
        for number, (_rule, pred) in enumerate(entries):
            leaf = required_leaf(pred)
            if leaf is None:
                self.always.append(number)
                continue
            key = (leaf.name, leaf.lowered)
            if key not in fields:
                fields[key] = (re2.Set.SearchSet(), [])
            regex_set, owners = fields[key]
            regex_set.Add(leaf.pattern())
            owners.append(number)
        for regex_set, _owners in fields.values():
            regex_set.Compile()
        self.sets = [
            (name, low, rs, owners) for (name, low), (rs, owners) in fields.items()
        ]

    def candidates(self, subject: Subject) -> list[int]:
        """The positions of the rules that may match, in order."""
        found = list(self.always)
        for name, lowered, regex_set, owners in self.sets:
            value = subject.lowered(name) if lowered else subject.value(name)
            if value is None:
                continue
            texts = value if isinstance(value, tuple) else (as_text(value),)
            for text in texts:
                hits = regex_set.Match(utf8(text)) or ()
                found.extend(owners[i] for i in hits)
        return sorted(set(found))

    def match(self, subject: Subject) -> list[DetectionRule]:
        """The rules the event matches, in rule order."""
        entries = self.entries
        return [
            entries[i][0] for i in self.candidates(subject) if entries[i][1](subject)
        ]


@dataclass
class Verdict:
    """What one event gave: the detection rules it matched, the correlations fired."""

    matched: list[DetectionRule] = field(default_factory=list)
    correlations: list[CorrelationHit] = field(default_factory=list)


class SigmaEngine:
    """Evaluates a rule set on events, in the order they happened per agent.

    Args:
        ruleset: what :func:`immune.sigma.load_rules` gave.
        max_processes: the size of the process table (parent fields).
        max_groups: the most correlation groups held at once.
    """

    def __init__(
        self, ruleset: RuleSet, *, max_processes: int = 65_536, max_groups: int = 10_000
    ) -> None:
        self.ruleset = ruleset
        self.index = {kind: KindIndex(e) for kind, e in ruleset.by_kind().items()}
        self.processes = ProcessTable(max_processes)
        correlations = [
            rule for rule in ruleset.correlations if isinstance(rule, CorrelationRule)
        ]
        self.correlator = Correlator(correlations, max_groups)

    def evaluate(self, event: Event) -> Verdict:
        """Match one event against every rule of its kind."""
        verdict = Verdict()
        index = self.index.get(event.kind)
        if index is not None:
            subject = Subject(event, self.processes.parent(event))
            verdict.matched = index.match(subject)
            if verdict.matched and self.correlator.by_member:
                verdict.correlations = self.correlator.observe(verdict.matched, subject)
        self.processes.update(event)
        return verdict
