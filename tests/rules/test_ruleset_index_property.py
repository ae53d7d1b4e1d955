"""RuleSet.match (kind index, indexed conditions) equals testing every rule."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from immune.rules import RuleError

from .helpers import ev, ruleset

KINDS = ["exec", "exit", "open", "fork"]
_kind_value = st.one_of(
    st.sampled_from(KINDS),
    st.lists(st.sampled_from(KINDS), min_size=1, max_size=3),
    st.fixed_dictionaries(
        {"in": st.lists(st.sampled_from(KINDS), min_size=1, max_size=3)}
    ),
    st.fixed_dictionaries({"equals": st.sampled_from(KINDS)}),
    # More than membership: the index cannot stand for these.
    st.fixed_dictionaries(
        {
            "in": st.lists(st.sampled_from(KINDS), min_size=1, max_size=3),
            "startswith": st.sampled_from(["e", "o", "x"]),
        }
    ),
)
_leaf = st.one_of(
    st.fixed_dictionaries({"kind": _kind_value}),
    st.fixed_dictionaries({"uid": st.sampled_from([0, 1, [0, 1]])}),
    st.fixed_dictionaries(
        {
            "exe": st.sampled_from(
                [
                    "/bin/sh",
                    {"startswith": ["/tmp/", "/bin"]},
                    {"contains": "sh"},
                    {"regex": ["sh$", "^/tmp"]},
                    {"in": ["/bin/sh", "/tmp/x"]},
                ]
            )
        }
    ),
    st.fixed_dictionaries(
        {
            "extra.x": st.sampled_from(
                [
                    1,
                    True,
                    "1",
                    {"in": ["1", "a"]},
                    {"in": [1, True]},
                    {"startswith": "a"},
                    {"exists": True},
                ]
            )
        }
    ),
)


def _condition(depth: int = 2):
    if depth == 0:
        return _leaf
    inner = _condition(depth - 1)
    return st.one_of(
        _leaf,
        st.builds(lambda a, b: {**a, **b}, _leaf, inner),
        st.builds(lambda xs: {"any": xs}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda x: {"not": x}, inner),
        st.builds(lambda a: {"macro": "m", **a}, _leaf),
    )


_events = st.builds(
    lambda kind, uid, exe, extra: ev(kind, uid=uid, exe=exe, extra=extra),
    st.sampled_from(KINDS),
    st.sampled_from([0, 1, None]),
    st.sampled_from(["/bin/sh", "/tmp/x", "/usr/bin/true", None]),
    st.sampled_from(
        [None, {"x": 1}, {"x": True}, {"x": "1"}, {"x": "abc"}, {"x": 1.0}, {"x": None}]
    ),
)


@settings(max_examples=1500, deadline=None)
@given(
    st.lists(
        st.tuples(
            _condition(),
            st.one_of(
                st.none(), st.lists(st.sampled_from(KINDS), min_size=1, max_size=3)
            ),
        ),
        min_size=1,
        max_size=4,
    ),
    _condition(0),
    st.lists(_events, min_size=1, max_size=6),
)
def test_ruleset_match_equals_every_rule(rules, macro, events) -> None:
    lines = ["macros:", f"  m: {orjson.dumps(macro).decode()}", "rules:"]
    for n, (condition, kinds) in enumerate(rules):
        lines.append(f"  - id: r{n}")
        lines.append(f"    condition: {orjson.dumps(condition).decode()}")
        if kinds is not None:
            lines.append(f"    kinds: {orjson.dumps(kinds).decode()}")
    try:
        rs = ruleset("\n".join(lines) + "\n")
    except RuleError:
        return
    for event in events:
        got = [r.id for r in rs.match(event)]
        want = [
            r.id
            for r in rs.rules.values()
            if r.enabled
            and r.matches(event)
            and (r.kinds is None or event.kind in r.kinds)
        ]
        assert sorted(got) == sorted(want), (event.kind, lines)


def test_kind_in_with_another_operator_keeps_its_kind_test() -> None:
    rules = ruleset(
        """\
rules:
  - id: opens-only
    condition: {kind: {in: [exec, open], startswith: o}, uid: 0}
"""
    )
    rule = rules.rules["opens-only"]
    assert rule.indexed is None
    assert not rule.matches(ev("exec", uid=0))
    assert [r.id for r in rules.match(ev("open", uid=0))] == ["opens-only"]
    assert rules.match(ev("exec", uid=0)) == []
