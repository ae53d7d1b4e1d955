"""Sigma rules evaluated on IMMUNE's events.

Rules are parsed by pySigma, their fields mapped onto IMMUNE's events by a
pySigma processing pipeline (:mod:`immune.sigma.fields`), and their
detections compiled into Python predicates (:mod:`immune.sigma.compiler`).
Rules that cannot be evaluated are refused with the reason
(:mod:`immune.sigma.loader`). Correlation rules are followed over time by
:mod:`immune.sigma.correlation`. See ``docs/sigma.md``.

Use::

    from immune.sigma import SigmaEngine, load_rules

    ruleset = load_rules(["rules/"])
    engine = SigmaEngine(ruleset)
    verdict = engine.evaluate(event)
"""

from __future__ import annotations

from immune.sigma.correlation import CorrelationHit, CorrelationRule
from immune.sigma.engine import SigmaEngine, Verdict
from immune.sigma.loader import (
    DetectionRule,
    Refusal,
    RuleSet,
    SigmaLoadError,
    load_rules,
)

__all__ = [
    "CorrelationHit",
    "CorrelationRule",
    "DetectionRule",
    "Refusal",
    "RuleSet",
    "SigmaEngine",
    "SigmaLoadError",
    "Verdict",
    "load_rules",
]
