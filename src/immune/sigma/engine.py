"""Running a Sigma rule set on a stream of events.

The engine keeps what evaluation needs besides the rules: the process table
that gives the parent fields, and the state of the correlation rules. It is
plain Python with no hive in it, so the plugin, the CLI and the benchmark
share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from immune.events import Event
from immune.sigma.correlation import CorrelationHit, CorrelationRule, Correlator
from immune.sigma.fields import ProcessTable, Subject
from immune.sigma.loader import DetectionRule, RuleSet


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
        self.index = ruleset.by_kind()
        self.processes = ProcessTable(max_processes)
        correlations = [
            rule for rule in ruleset.correlations if isinstance(rule, CorrelationRule)
        ]
        self.correlator = Correlator(correlations, max_groups)

    def evaluate(self, event: Event) -> Verdict:
        """Match one event against every rule of its kind."""
        verdict = Verdict()
        rules = self.index.get(event.kind)
        if rules:
            subject = Subject(event, self.processes.parent(event))
            verdict.matched = [rule for rule, pred in rules if pred(subject)]
            if verdict.matched and self.correlator.by_member:
                verdict.correlations = self.correlator.observe(verdict.matched, subject)
        self.processes.update(event)
        return verdict
