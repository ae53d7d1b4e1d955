"""Events and rule sets for the rule tests."""

from __future__ import annotations

import itertools
import textwrap
from typing import Any

from immune.events import Event
from immune.rules.ruleset import RuleSet, add_text

_ids = itertools.count()
NS = 1_000_000_000
T0 = 1_700_000_000 * NS


def ev(kind: str = "exec", agent: str = "a1", at: float = 0, **fields: Any) -> Event:
    """An event ``at`` seconds after T0."""
    return Event(
        id=f"ev-{next(_ids)}",
        agent_id=agent,
        host=f"{agent}.test",
        ts=T0 + int(at * NS),
        kind=kind,
        **fields,
    )


def ruleset(text: str, file: str = "test.yaml") -> RuleSet:
    """A rule set from YAML text alone (no defaults)."""
    rules = RuleSet()
    add_text(rules, textwrap.dedent(text), file)
    rules.index()
    return rules
