"""docs/rules.md against the code: every YAML example loads and its tests pass."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from immune.rules import Context, compile_condition, load_rules
from immune.rules._yaml import load
from immune.rules.ruleset import SECTIONS, add_text
from immune.rules.testing import run_rule_tests

DOC = Path(__file__).resolve().parent.parent / "docs" / "rules.md"
BLOCKS = re.findall(r"^```yaml\n(.*?)^```$", DOC.read_text(), re.MULTILINE | re.DOTALL)


def test_docs_rules_has_examples():
    assert len(BLOCKS) >= 8


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_docs_rules_example_loads(number):
    text = BLOCKS[number]
    doc = load(text, "rules.md")
    defaults = load_rules([], defaults=True)
    if set(doc) <= set(SECTIONS):
        add_text(defaults, text, "rules.md")
        defaults.index()
        results = run_rule_tests(defaults, ["rules.md"])
        assert [r.where for r in results if not r.ok] == []
    elif "condition" in doc:
        context = Context(lists=defaults.lists, macros=defaults.macros)
        compile_condition(doc["condition"], context)
    else:
        assert set(doc) <= {"expect", "exact"}, f"an example of what? {set(doc)}"
