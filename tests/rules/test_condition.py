"""Conditions: each operator, the combinators, and refusals with a line."""

from __future__ import annotations

import pytest

from immune.rules import Context, RuleError, compile_condition
from immune.rules._yaml import load
from immune.rules.condition import kinds_of

from .helpers import ev


def cond(obj, **lists):
    return compile_condition(obj, Context(lists=lists))


@pytest.mark.parametrize(
    ("condition", "event", "expected"),
    [
        ({"exe": "/bin/sh"}, ev(exe="/bin/sh"), True),
        ({"exe": "/bin/sh"}, ev(exe="/bin/bash"), False),
        ({"exe": {"equals": "/bin/sh"}}, ev(exe="/bin/sh"), True),
        ({"exe": {"contains": "bin"}}, ev(exe="/usr/bin/x"), True),
        ({"exe": {"contains": ["zz", "usr"]}}, ev(exe="/usr/bin/x"), True),
        ({"exe": {"contains": "sbin"}}, ev(exe="/usr/bin/x"), False),
        ({"exe": {"startswith": ["/tmp/", "/var/tmp/"]}}, ev(exe="/var/tmp/a"), True),
        ({"exe": {"startswith": "/tmp/"}}, ev(exe="/tmpx/a"), False),
        ({"exe": {"endswith": "/nc"}}, ev(exe="/usr/bin/nc"), True),
        ({"exe": {"endswith": "/nc"}}, ev(exe="/usr/bin/ncat"), False),
        (
            {"cmdline": {"regex": r"-e\s+/bin/sh"}},
            ev(argv=["nc", "-e", "/bin/sh"]),
            True,
        ),
        ({"cmdline": {"regex": "^nc "}}, ev(argv=["ncat", "x"]), False),
        ({"argv": {"equals": "-e"}}, ev(argv=["nc", "-e", "x"]), True),
        ({"argv": {"equals": "-c"}}, ev(argv=["nc", "-e", "x"]), False),
        ({"port": [4444, 5555]}, ev("connect", port=5555), True),
        ({"port": {"in": [4444]}}, ev("connect", port=4445), False),
        ({"addr": {"cidr": "10.0.0.0/8"}}, ev("connect", addr="10.2.3.4"), True),
        (
            {"addr": {"cidr": ["10.0.0.0/8", "::1/128"]}},
            ev("connect", addr="::1"),
            True,
        ),
        ({"addr": {"cidr": "10.0.0.0/8"}}, ev("connect", addr="11.0.0.1"), False),
        ({"addr": {"cidr": "10.0.0.0/8"}}, ev("connect", addr="/run/x.sock"), False),
        ({"port": {"lt": 1024}}, ev("bind", port=80), True),
        ({"port": {"le": 80}}, ev("bind", port=80), True),
        ({"port": {"gt": 80}}, ev("bind", port=80), False),
        ({"port": {"ge": 80, "lt": 81}}, ev("bind", port=80), True),
        ({"uid": {"exists": True}}, ev(uid=0), True),
        ({"uid": {"exists": True}}, ev(), False),
        ({"uid": None}, ev(), True),
        ({"extra.sha256": "ab"}, ev(extra={"sha256": "ab"}), True),
        ({"extra.n": {"gt": 3}}, ev(extra={"n": "9"}), False),  # text is no number
        ({"exe_name": "nc"}, ev(exe="/usr/bin/nc"), True),
        ({"exe": {"startswith": "/"}}, ev(), False),  # a missing field never matches
        ({"not": {"exe": "/bin/sh"}}, ev(exe="/bin/sh"), False),
        ({"any": [{"uid": 0}, {"euid": 0}]}, ev(uid=5, euid=0), True),
        ({"all": [{"uid": 0}, {"euid": 0}]}, ev(uid=5, euid=0), False),
        ({"kind": "exec", "uid": 0}, ev("exec", uid=0), True),
        ({"kind": "exec", "uid": 0}, ev("fork", uid=0), False),
    ],
)
def test_condition_operator(condition, event, expected):
    assert cond(condition)(event) is expected


def test_condition_booleans_are_not_numbers():
    test = cond({"extra.flag": {"in": [1]}})
    assert test(ev(extra={"flag": 1}))
    assert not test(ev(extra={"flag": True}))


def test_condition_named_list_and_macro():
    context = Context(
        lists={"temp": ["/tmp/", "/dev/shm/"]},
        macros={"in_temp": {"exe": {"startswith": {"list": "temp"}}}},
    )
    test = compile_condition({"macro": "in_temp", "uid": {"gt": 0}}, context)
    assert test(ev(exe="/dev/shm/x", uid=1000))
    assert not test(ev(exe="/dev/shm/x", uid=0))
    assert not test(ev(exe="/usr/bin/x", uid=1000))


def test_condition_list_shorthand_on_a_field():
    test = cond({"port": {"list": "ports"}}, ports=[1, 2])
    assert test(ev("connect", port=2)) and not test(ev("connect", port=3))


def refusal(text: str, **context) -> RuleError:
    with pytest.raises(RuleError) as info:
        compile_condition(load(text, "c.yaml"), Context(file="c.yaml", **context))
    return info.value


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("exe: /x\nbogus: 1\n", 2, "unknown field 'bogus'"),
        ("exe:\n  within: /x\n", 2, "unknown operator 'within'"),
        ("port: {contains: '44'}\n", 1, "port is a number"),
        ("exe: {gt: 3}\n", 1, "exe is text"),
        ("exe: {regex: '(a'}\n", 1, "refused by RE2"),
        ("exe: {regex: '(?=x)'}\n", 1, "refused by RE2"),  # lookahead: not linear
        ("addr: {cidr: 10.0.0.300/8}\n", 1, "not a network"),
        ("exe: {startswith: {list: nowhere}}\n", 1, "unknown list 'nowhere'"),
        ("macro: nope\n", 1, "unknown macro 'nope'"),
        ("kind: teleport\n", 1, "unknown event kind"),
        ("exe: {equals: [a, b]}\n", 1, "use in:"),
        ("any: []\n", 1, "non-empty list"),
        ("- exe: /x\n", 1, "use all: or any:"),
        ("exe: /a\nexe: /b\n", 2, "duplicate key 'exe'"),
        ("exe: {in: []}\n", 1, "at least one value"),
    ],
)
def test_condition_refused_with_line_and_reason(text, line, words):
    error = refusal(text)
    assert error.file == "c.yaml"
    assert error.line == line
    assert words in error.reason
    assert str(error).startswith(f"c.yaml:{line}: ")


def test_condition_macro_loop_is_refused():
    error = refusal("macro: a\n", macros={"a": {"macro": "b"}, "b": {"macro": "a"}})
    assert "refers to itself: a -> b -> a" in error.reason


@pytest.mark.parametrize(
    ("condition", "kinds"),
    [
        ({"kind": "exec"}, {"exec"}),
        ({"kind": ["exec", "fork"], "uid": 0}, {"exec", "fork"}),
        ({"kind": {"in": ["open"]}}, {"open"}),
        ({"all": [{"uid": 0}, {"kind": "setuid"}]}, {"setuid"}),
        ({"any": [{"kind": "exec"}, {"kind": "fork"}]}, {"exec", "fork"}),
        ({"any": [{"kind": "exec"}, {"uid": 0}]}, None),
        ({"uid": 0}, None),
    ],
)
def test_kinds_of_condition(condition, kinds):
    found = kinds_of(condition)
    assert (None if found is None else set(found)) == kinds
