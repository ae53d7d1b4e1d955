"""IMMUNE's rule language: detections on events, in YAML.

Public API::

    from immune.rules import compile_condition, load_rules, RuleError

    test = compile_condition({"exe": {"startswith": "/tmp/"}})
    ruleset = load_rules(["rules/"], defaults=True)
    for rule in ruleset.match(event): ...

See ``docs/rules.md`` for the language.
"""

from __future__ import annotations

from immune.rules.condition import Context, Predicate, compile_condition
from immune.rules.correlation import Correlation, Correlator, Finding, finding_alert
from immune.rules.errors import RuleError
from immune.rules.ruleset import DEFAULT_DIR, Rule, RuleSet, load_rules, rule_files

__all__ = [
    "DEFAULT_DIR",
    "Context",
    "Correlation",
    "Correlator",
    "Finding",
    "Predicate",
    "Rule",
    "RuleError",
    "RuleSet",
    "compile_condition",
    "finding_alert",
    "load_rules",
    "rule_files",
]
