"""A rule's regex list asked of an RE2 set finds what RE2 search finds."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from immune.rules.condition import compile_condition, compile_regex

from .helpers import ev

PATTERNS = [
    "",
    "^",
    "$",
    "^$",
    "a",
    "^a",
    "a$",
    "(?i)SH",
    "s.h",
    "\\bsh\\b",
    "[^/]+$",
    "^/tmp/",
    "/dev/(tcp|udp)/",
    "x*",
    "\\d{2,}",
    "é",
    "(?s)a.b",
    "a\\nb",
    "^\\s*$",
]


@settings(max_examples=800, deadline=None)
@given(
    st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=4),
    st.text(alphabet="aAbsShx/tmpdevuc \n\t0123é", max_size=30),
)
def test_regex_set_agrees_with_search(patterns: list[str], text: str) -> None:
    test = compile_condition({"exe": {"regex": patterns}})
    expected = any(compile_regex(p).search(text) is not None for p in patterns)
    assert test(ev(exe=text)) is expected
    assert test(ev()) is False
