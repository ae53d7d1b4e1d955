"""Property tests: Sigma's value modifiers and conditions against references.

Each test builds a one-rule detection with pySigma, compiles it with IMMUNE's
evaluator and compares its answer, on generated events, with a plain and
obviously correct implementation written here: a wildcard matcher by
dynamic programming, Python's ``re``, ``ipaddress``, ``base64``, comparison
operators, and Python's own boolean logic for conditions.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Callable
from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sigma.rule import SigmaRule
from sigma_helpers import ev

from immune.events import Event
from immune.sigma.compiler import compile_rule
from immune.sigma.fields import Subject, pipeline

SETTINGS = settings(max_examples=150, deadline=None)


def matcher(
    detection: dict[str, Any], category: str = "process_creation", kind: str = "exec"
) -> Callable[[Event], bool]:
    """The compiled predicate of a rule with this detection, for one kind."""
    rule = SigmaRule.from_dict(
        {
            "title": "property",
            "logsource": {"product": "linux", "category": category},
            "detection": detection,
        }
    )
    pipeline().apply(rule)
    node = compile_rule(rule, kind).node
    if isinstance(node, bool):
        return lambda event: node
    return lambda event: node(Subject(event))


def cmd(text: str) -> Event:
    return ev(exe="/usr/bin/x", argv=[text])


# -- wildcards and the string modifiers ---------------------------------------

TEXT = st.text(alphabet="abcAB-/ .*?\\é", max_size=12)
PATTERN = st.text(alphabet="abAB-/ .*?\\é", min_size=1, max_size=8)


def tokens(pattern: str) -> list[tuple[str, str]]:
    """Sigma's escapes: \\* \\? \\\\ are literal, any other backslash too."""
    out, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern) and pattern[i + 1] in "*?\\":
            out.append(("lit", pattern[i + 1]))
            i += 2
            continue
        out.append(
            ("star", "")
            if char == "*"
            else ("one", "")
            if char == "?"
            else ("lit", char)
        )
        i += 1
    return out


def glob(toks: list[tuple[str, str]], text: str) -> bool:
    """Reference matcher: dynamic programming over tokens and characters."""
    text = text.lower()
    reach = [True] + [False] * len(text)  # reach[j]: tokens so far match text[:j]
    for kind, char in toks:
        if kind == "star":
            for j in range(1, len(text) + 1):
                reach[j] = reach[j] or reach[j - 1]
            continue
        nxt = [False] * (len(text) + 1)
        for j in range(1, len(text) + 1):
            ok = kind == "one" or text[j - 1] == char.lower()
            nxt[j] = reach[j - 1] and ok
        reach = nxt
    return reach[-1]


def instance(pattern: str, fill: str) -> str:
    """A text the pattern matches: each wildcard replaced by ``fill``."""
    parts = []
    for kind, char in tokens(pattern):
        parts.append(
            char if kind == "lit" else (fill or "z")[: 1 if kind == "one" else None]
        )
    return "".join(parts)


MODIFIERS = {
    "": lambda toks: toks,
    "|contains": lambda toks: [("star", ""), *toks, ("star", "")],
    "|startswith": lambda toks: [*toks, ("star", "")],
    "|endswith": lambda toks: [("star", ""), *toks],
}


@SETTINGS
@given(
    pattern=PATTERN,
    modifier=st.sampled_from(sorted(MODIFIERS)),
    before=TEXT,
    after=TEXT,
    fill=TEXT,
    noise=TEXT,
    embed=st.booleans(),
)
def test_sigma_string_modifiers_agree_with_reference_glob(
    pattern: str,
    modifier: str,
    before: str,
    after: str,
    fill: str,
    noise: str,
    embed: bool,
) -> None:
    match = matcher({"sel": {f"CommandLine{modifier}": pattern}, "condition": "sel"})
    text = before + instance(pattern, fill) + after if embed else noise
    expected = glob(MODIFIERS[modifier](tokens(pattern)), text)
    assert match(cmd(text)) is expected


@SETTINGS
@given(pattern=PATTERN, text=TEXT)
def test_sigma_cased_modifier_keeps_case(pattern: str, text: str) -> None:
    match = matcher({"sel": {"CommandLine|cased": pattern}, "condition": "sel"})
    assert match(cmd(text)) is _cased_glob(tokens(pattern), text)
    assert match(cmd(instance(pattern, text))) is True


def _cased_glob(toks: list[tuple[str, str]], text: str) -> bool:
    regex = "".join(
        ".*" if k == "star" else "." if k == "one" else re.escape(c) for k, c in toks
    )
    return re.fullmatch(regex, text, re.DOTALL) is not None


@SETTINGS
@given(
    values=st.lists(
        st.text(alphabet="abc-", min_size=1, max_size=3), min_size=1, max_size=4
    ),
    text=TEXT,
)
def test_sigma_all_modifier_needs_every_value(values: list[str], text: str) -> None:
    match = matcher({"sel": {"CommandLine|contains|all": values}, "condition": "sel"})
    assert match(cmd(text)) is all(v.lower() in text.lower() for v in values)
    any_match = matcher({"sel": {"CommandLine|contains": values}, "condition": "sel"})
    assert any_match(cmd(text)) is any(v.lower() in text.lower() for v in values)


# -- regular expressions --------------------------------------------------------

ATOM = st.sampled_from(["a", "b", "A", ".", "[ab]", "[^a]", "\\d", "\\s", "-"])
QUANT = st.sampled_from(["", "*", "+", "?", "{1,2}"])
PIECE = st.tuples(ATOM, QUANT).map("".join)
BRANCH = st.lists(PIECE, min_size=1, max_size=4).map("".join)
REGEX = st.tuples(
    st.sampled_from(["", "^"]),
    st.lists(BRANCH, min_size=1, max_size=3).map("|".join),
    st.sampled_from(["", "$"]),
).map(lambda t: f"{t[0]}(?:{t[1]}){t[2]}")


@SETTINGS
@given(
    regex=REGEX,
    text=st.text(alphabet="abAB1 -\n", max_size=10),
    flags=st.sampled_from(["", "|i", "|m", "|s"]),
)
def test_sigma_re_modifier_agrees_with_python_re(
    regex: str, text: str, flags: str
) -> None:
    match = matcher({"sel": {f"CommandLine|re{flags}": regex}, "condition": "sel"})
    py_flags = {"": 0, "|i": re.IGNORECASE, "|m": re.MULTILINE, "|s": re.DOTALL}[flags]
    if flags != "|m":
        # RE2's $ is the end of the text; Python's also matches before a last \n.
        regex = regex.replace("$", r"\Z")
    assert match(cmd(text)) is (re.search(regex, text, py_flags) is not None)


# -- networks, numbers, encodings -------------------------------------------------


@SETTINGS
@given(
    network=st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).flatmap(
        lambda a: st.integers(0, a.max_prefixlen).map(
            lambda p: ipaddress.ip_network(f"{a}/{p}", strict=False)
        )
    ),
    addr=st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
)
def test_sigma_cidr_modifier_agrees_with_ipaddress(
    network: ipaddress.IPv4Network | ipaddress.IPv6Network,
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    match = matcher(
        {"sel": {"DestinationIp|cidr": str(network)}, "condition": "sel"},
        "network_connection",
        "connect",
    )
    event = ev("connect", addr=str(addr), port=1)
    assert match(event) is (addr in network)
    first = ev("connect", addr=str(network.network_address), port=1)
    assert match(first) is True


OPS = {
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
}


@SETTINGS
@given(
    op=st.sampled_from(sorted(OPS)),
    limit=st.integers(0, 70000),
    port=st.integers(0, 65535),
)
def test_sigma_comparison_modifiers_agree_with_python(
    op: str, limit: int, port: int
) -> None:
    match = matcher(
        {"sel": {f"DestinationPort|{op}": limit}, "condition": "sel"},
        "network_connection",
        "connect",
    )
    assert match(ev("connect", addr="192.0.2.1", port=port)) is OPS[op](port, limit)


PAYLOAD = st.text(alphabet="abcdef /;+=-", min_size=1, max_size=12)


@SETTINGS
@given(
    value=PAYLOAD,
    other=PAYLOAD,
    before=st.binary(max_size=5),
    after=st.binary(max_size=5),
)
def test_sigma_base64_modifiers_find_the_encoded_value(
    value: str, other: str, before: bytes, after: bytes
) -> None:
    plain = matcher({"sel": {"CommandLine|base64|contains": value}, "condition": "sel"})
    encoded = base64.b64encode(value.encode()).decode()
    assert plain(cmd(f"echo {encoded} | base64 -d")) is True
    noise = base64.b64encode(other.encode()).decode()
    assert plain(cmd(noise)) is (encoded.lower() in noise.lower())

    # base64offset finds the value wherever it sits in the encoded bytes.
    offset = matcher(
        {"sel": {"CommandLine|base64offset|contains": value}, "condition": "sel"}
    )
    wrapped = base64.b64encode(before + value.encode() + after).decode()
    assert offset(cmd(wrapped)) is True


DASHES = ["-", "/", "\u2013", "\u2014", "\u2015"]


@SETTINGS
@given(
    flag=st.text(alphabet="abcxyz", min_size=1, max_size=4),
    dash=st.sampled_from([*DASHES, "+", "_", "~"]),
)
def test_sigma_windash_modifier_takes_every_dash(flag: str, dash: str) -> None:
    match = matcher(
        {"sel": {"CommandLine|windash|contains": f" -{flag}"}, "condition": "sel"}
    )
    assert match(cmd(f"tool {dash}{flag} x")) is (dash in DASHES)


@SETTINGS
@given(
    words=st.lists(
        st.text(alphabet="abc.", min_size=1, max_size=3), min_size=1, max_size=3
    ),
    text=TEXT,
    path=TEXT,
)
def test_sigma_keywords_search_the_event_text(
    words: list[str], text: str, path: str
) -> None:
    match = matcher({"keywords": words, "condition": "keywords"}, "file_event", "open")
    event = ev("open", argv=[text], path=path or None)
    haystack = " ".join(p for p in (text, path) if p).lower()
    assert match(event) is any(w.lower() in haystack for w in words)


# -- conditions -------------------------------------------------------------------

NAMES = ["selection_a", "selection_b", "filter_c"]
LEAF = st.sampled_from(
    [*NAMES, "1 of selection_*", "all of selection_*", "all of them", "1 of them"]
)


def expressions(depth: int) -> st.SearchStrategy[str]:
    if depth == 0:
        return LEAF
    inner = expressions(depth - 1)
    return st.one_of(
        LEAF,
        inner.map(lambda e: f"not {e}"),
        st.tuples(inner, st.sampled_from(["and", "or"]), inner).map(
            lambda t: f"({t[0]} {t[1]} {t[2]})"
        ),
    )


def reference(expression: str, truth: dict[str, bool]) -> bool:
    sel = [truth["selection_a"], truth["selection_b"]]
    python = (
        expression.replace("1 of selection_*", str(any(sel)))
        .replace("all of selection_*", str(all(sel)))
        .replace("all of them", str(all(truth.values())))
        .replace("1 of them", str(any(truth.values())))
    )
    for name in NAMES:
        python = python.replace(name, str(truth[name]))
    return bool(eval(python))  # only True, False, and, or, not and brackets


@SETTINGS
@given(
    expression=expressions(3),
    truth=st.fixed_dictionaries({n: st.booleans() for n in NAMES}),
)
def test_sigma_conditions_agree_with_python_logic(
    expression: str, truth: dict[str, bool]
) -> None:
    detection: dict[str, Any] = {n: {"CommandLine|contains": f"<{n}>"} for n in NAMES}
    detection["condition"] = expression
    match = matcher(detection)
    text = " ".join(f"<{n}>" for n, on in truth.items() if on) or "nothing"
    assume("selection" in expression or "them" in expression or "filter" in expression)
    assert match(cmd(text)) is reference(expression, truth)


@SETTINGS
@given(value=st.text(alphabet="abAB", min_size=1, max_size=3), text=TEXT)
def test_sigma_neq_modifier_is_the_opposite(value: str, text: str) -> None:
    match = matcher({"sel": {"CommandLine|neq": value}, "condition": "sel"})
    assert match(cmd(text)) is (text.lower() != value.lower())
    assert match(ev(exe="/x", argv=None)) is True  # no command line at all


def test_sigma_exists_null_and_fieldref() -> None:
    exists = matcher({"sel": {"CurrentDirectory|exists": True}, "condition": "sel"})
    assert exists(ev(cwd="/srv")) is True
    assert exists(ev(cwd=None)) is False
    null = matcher({"sel": {"CurrentDirectory": None}, "condition": "sel"})
    assert null(ev(cwd=None)) is True
    assert null(ev(cwd="")) is True
    assert null(ev(cwd="/srv")) is False
    same = matcher({"sel": {"CurrentDirectory|fieldref": "Image"}, "condition": "sel"})
    assert same(ev(cwd="/opt/x", exe="/OPT/X")) is True
    assert same(ev(cwd="/opt", exe="/opt/x")) is False
    assert same(ev(cwd=None, exe="/opt/x")) is False
