"""Each operator against a plain Python reference, on generated values."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from immune.rules import compile_condition

from .helpers import ev

TEXT = st.text(alphabet="ab/. -", max_size=10)
NEEDLES = st.lists(st.text(alphabet="ab/. -", max_size=3), min_size=1, max_size=3)
MAYBE_TEXT = st.none() | TEXT
PORTS = st.integers(0, 65535)
MAYBE_PORT = st.none() | PORTS

# A small regex grammar on which Python's re and RE2 agree.
PIECES = ["a", "b", "/", r"\.", ".", "[ab]", "[^a]", "a*", "b+", "a?", r"\d", "^", "$"]
REGEX = st.lists(st.sampled_from(PIECES), min_size=1, max_size=5).map("".join)


def text_reference(op: str, value: str | None, operands: list[str]) -> bool:
    if value is None:
        return False
    if op == "contains":
        return any(o in value for o in operands)
    if op == "startswith":
        return any(value[: len(o)] == o for o in operands)
    if op == "endswith":
        return any(
            len(value) >= len(o) and value[len(value) - len(o) :] == o for o in operands
        )
    raise AssertionError(op)


@given(st.sampled_from(["contains", "startswith", "endswith"]), MAYBE_TEXT, NEEDLES)
def test_text_operators_agree_with_reference(op, value, operands):
    test = compile_condition({"exe": {op: operands}})
    assert test(ev(exe=value)) == text_reference(op, value, operands)


@given(MAYBE_TEXT, TEXT)
def test_equals_agrees_with_reference(value, operand):
    test = compile_condition({"exe": {"equals": operand}})
    assert test(ev(exe=value)) == (value is not None and value == operand)


@given(MAYBE_PORT, st.lists(PORTS, min_size=1, max_size=5))
def test_in_agrees_with_reference(value, operands):
    test = compile_condition({"port": {"in": operands}})
    assert test(ev("connect", port=value)) == (value is not None and value in operands)


@given(MAYBE_TEXT, st.lists(REGEX, min_size=1, max_size=3))
def test_regex_agrees_with_python_re(value, patterns):
    test = compile_condition({"exe": {"regex": patterns}})
    expected = value is not None and any(re.search(p, value) for p in patterns)
    assert test(ev(exe=value)) == expected


@given(st.lists(TEXT, max_size=4), NEEDLES)
def test_list_field_matches_if_any_item_does(argv, operands):
    test = compile_condition({"argv": {"contains": operands}})
    expected = any(text_reference("contains", a, operands) for a in argv)
    assert test(ev(argv=argv)) == expected


@given(
    st.sampled_from(["lt", "le", "gt", "ge"]),
    MAYBE_PORT,
    st.integers(-1, 65536) | st.floats(-1, 65536, allow_nan=False),
)
def test_comparisons_agree_with_reference(op, value, bound):
    test = compile_condition({"port": {op: bound}})
    if value is None:
        expected = False
    else:
        expected = {
            "lt": value < bound,
            "le": value <= bound,
            "gt": value > bound,
            "ge": value >= bound,
        }[op]
    assert test(ev("bind", port=value)) == expected


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 32))
def test_cidr_agrees_with_integer_arithmetic(address, network, prefix):
    text = str(ipaddress.IPv4Address(address))
    net = f"{ipaddress.IPv4Address(network)}/{prefix}"
    test = compile_condition({"addr": {"cidr": net}})
    shift = 32 - prefix
    assert test(ev("connect", addr=text)) == (address >> shift == network >> shift)


@given(st.integers(0, 2**128 - 1), st.integers(0, 2**128 - 1), st.integers(0, 128))
def test_cidr_v6_agrees_with_integer_arithmetic(address, network, prefix):
    text = str(ipaddress.IPv6Address(address))
    net = f"{ipaddress.IPv6Address(network)}/{prefix}"
    test = compile_condition({"addr": {"cidr": net}})
    shift = 128 - prefix
    assert test(ev("connect", addr=text)) == (address >> shift == network >> shift)


# -- and, or, not over random trees ----------------------------------------------

LEAVES = st.sampled_from(
    [
        ({"uid": 0}, lambda e: e.uid == 0),
        ({"euid": {"gt": 100}}, lambda e: e.euid is not None and e.euid > 100),
        ({"exe": {"startswith": "/tmp/"}}, lambda e: (e.exe or "").startswith("/tmp/")),
        ({"exe": {"exists": False}}, lambda e: e.exe is None),
    ]
)


def trees(leaf: Any) -> Any:
    def extend(children: Any) -> Any:
        lists = st.lists(children, min_size=1, max_size=3)
        return (
            st.tuples(st.just("all"), lists)
            | st.tuples(st.just("any"), lists)
            | st.tuples(st.just("not"), children)
        )

    return st.recursive(leaf.map(lambda pair: ("leaf", pair)), extend, max_leaves=8)


def build(tree: Any) -> tuple[Any, Any]:
    kind, body = tree
    if kind == "leaf":
        return body
    if kind == "not":
        condition, reference = build(body)
        return {"not": condition}, lambda e: not reference(e)
    built = [build(child) for child in body]
    combine = all if kind == "all" else any
    return (
        {kind: [c for c, _ in built]},
        lambda e: combine(r(e) for _, r in built),
    )


@given(
    trees(LEAVES),
    st.none() | st.integers(0, 2),
    st.none() | st.integers(0, 200),
    st.sampled_from([None, "/tmp/x", "/usr/bin/x"]),
)
def test_combinators_agree_with_reference(tree, uid, euid, exe):
    condition, reference = build(tree)
    event = ev(uid=uid, euid=euid, exe=exe)
    assert compile_condition(condition)(event) == reference(event)
