"""Sigma detections compiled into predicates over events.

pySigma parses a rule into a condition tree (``rule.detection.parsed_condition``)
whose leaves are a field and a typed value: a string with wildcards, a regular
expression, a CIDR network, a number comparison, and so on, after the value
modifiers (``contains``, ``base64offset``, ``windash``...) have been applied.
This module turns each leaf into a small function of a
:class:`~immune.sigma.fields.Subject` and joins them as the tree says. Leaves
that can never be true or always are fold away, so ``1 of selection_*`` over
one impossible selection costs nothing.

Matching follows the Sigma specification: strings compare without regard to
case unless ``cased``, ``*`` and ``?`` are wildcards, a field the event does
not have matches nothing (so ``not`` of it holds), and a field holding
several values matches when any of them does. Regular expressions run on
RE2, so no rule can make matching slower than linear; a pattern RE2 cannot
compile (back-references, look-arounds) refuses the rule.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field

import re2
from sigma.conditions import (
    ConditionAND,
    ConditionFieldEqualsValueExpression,
    ConditionNOT,
    ConditionOR,
    ConditionValueExpression,
)
from sigma.exceptions import SigmaError
from sigma.rule import SigmaRule
from sigma.types import (
    CompareOperators,
    Placeholder,
    SigmaBool,
    SigmaCasedString,
    SigmaCIDRExpression,
    SigmaCompareExpression,
    SigmaExists,
    SigmaExpansion,
    SigmaFieldReference,
    SigmaNull,
    SigmaNumber,
    SigmaRegularExpression,
    SigmaRegularExpressionFlag,
    SigmaString,
    SigmaTimestampPart,
    SigmaType,
    SpecialChars,
)

from immune.errors import ImmuneError
from immune.sigma.fields import FIELDS, Subject, Value

Predicate = Callable[[Subject], bool]
#: A compiled node: a predicate, or a constant when it does not depend on the event.
Node = Predicate | bool
TextTest = Callable[[str], bool]


class UnsupportedError(ImmuneError):
    """A rule uses something IMMUNE cannot evaluate; the message says what."""


@dataclass
class Compiled:
    """A rule's detection, compiled.

    Args:
        node: the predicate, or a constant when the rule cannot depend on the
            event (False when it can never match).
        fields: the IMMUNE fields it reads.
        notes: parts of the rule that can never match on IMMUNE's events, and why.
    """

    node: Node
    fields: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Context:
    kind: str
    fields: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)


def compile_rule(rule: SigmaRule, kind: str) -> Compiled:
    """Compile a rule, whose fields the pipeline has mapped, for one event kind.

    A field that events of that kind do not have matches nothing, as a
    missing field does. A rule with several conditions matches when any of
    them does.

    Raises:
        UnsupportedError: the rule uses a field, value or construct IMMUNE
            cannot evaluate.
    """
    ctx = _Context(kind)
    nodes: list[Node] = []
    for condition in rule.detection.parsed_condition:
        try:
            tree = condition.parsed
        except SigmaError as exc:
            raise UnsupportedError(f"condition {condition.condition!r}: {exc}") from exc
        nodes.append(_node(tree, ctx))
    return Compiled(_any(nodes), ctx.fields, ctx.notes)


def _node(tree: object, ctx: _Context) -> Node:
    if isinstance(tree, ConditionAND):
        return _all([_node(arg, ctx) for arg in tree.args])
    if isinstance(tree, ConditionOR):
        return _any([_node(arg, ctx) for arg in tree.args])
    if isinstance(tree, ConditionNOT):
        return _not(_node(tree.args[0], ctx))
    if isinstance(tree, ConditionFieldEqualsValueExpression):
        return compile_value(tree.field, tree.value, ctx)
    if isinstance(tree, ConditionValueExpression):
        return compile_value("keywords", tree.value, ctx, keyword=True)
    raise UnsupportedError(f"condition element {type(tree).__name__} is not supported")


# -- joining nodes -----------------------------------------------------------


def _all(nodes: list[Node]) -> Node:
    if any(node is False for node in nodes):
        return False
    preds = [node for node in nodes if not isinstance(node, bool)]
    if not preds:
        return True
    if len(preds) == 1:
        return preds[0]
    if len(preds) == 2:
        first, second = preds
        return lambda s: first(s) and second(s)
    return lambda s: all(pred(s) for pred in preds)


def _any(nodes: list[Node]) -> Node:
    if any(node is True for node in nodes):
        return True
    preds = [node for node in nodes if not isinstance(node, bool)]
    if not preds:
        return False
    if len(preds) == 1:
        return preds[0]
    if len(preds) == 2:
        first, second = preds
        return lambda s: first(s) or second(s)
    return lambda s: any(pred(s) for pred in preds)


def _not(node: Node) -> Node:
    if isinstance(node, bool):
        return not node
    return lambda s: not node(s)


# -- leaves ------------------------------------------------------------------


def compile_value(
    name: str, value: SigmaType, ctx: _Context, *, keyword: bool = False
) -> Node:
    """Compile one field-value test (or a keyword, on the ``keywords`` field).

    Raises:
        UnsupportedError: an unknown field or a value type IMMUNE cannot test.
    """
    if name not in FIELDS:
        raise UnsupportedError(f"field {name!r} is not an IMMUNE event field")
    ctx.fields.add(name)
    if isinstance(value, SigmaExpansion):
        return _any(
            [compile_value(name, v, ctx, keyword=keyword) for v in value.values]
        )
    if isinstance(value, SigmaString):
        node = _string(name, value, ctx, keyword=keyword)
    else:
        node = _typed(name, value, ctx)
    return node if ctx.kind in FIELDS[name].kinds else False


def _typed(name: str, value: SigmaType, ctx: _Context) -> Node:
    if isinstance(value, SigmaRegularExpression):
        return _regex(name, value)
    if isinstance(value, SigmaCIDRExpression):
        return _cidr(name, value)
    if isinstance(value, SigmaCompareExpression):
        return _compare(name, value)
    if isinstance(value, SigmaTimestampPart):
        msg = f"field {name!r}: timestamp parts are not supported"
        raise UnsupportedError(msg)
    if isinstance(value, SigmaNumber):
        return _number(name, value)
    if isinstance(value, SigmaBool):
        return _bool(name, value.boolean)
    if isinstance(value, SigmaNull):
        return lambda s: s.value(name) in (None, "", ())
    if isinstance(value, SigmaExists):
        wanted = value.exists
        return lambda s: (s.value(name) not in (None, ())) is wanted
    if isinstance(value, SigmaFieldReference):
        return _fieldref(name, value, ctx)
    msg = f"field {name!r}: values of type {type(value).__name__} are not supported"
    raise UnsupportedError(msg)


def _string(name: str, value: SigmaString, ctx: _Context, *, keyword: bool) -> Node:
    parts = list(value.s)
    if keyword:
        # Keywords search the whole text of the event, as a full-text search does.
        if parts[:1] != [SpecialChars.WILDCARD_MULTI]:
            parts.insert(0, SpecialChars.WILDCARD_MULTI)
        if parts[-1:] != [SpecialChars.WILDCARD_MULTI]:
            parts.append(SpecialChars.WILDCARD_MULTI)
    cased = isinstance(value, SigmaCasedString)
    test = text_test(parts, cased=cased)
    spec = FIELDS[name]
    if spec.constant is not None and spec.domain is not None:
        # Known for each kind in advance: decide now.
        def fits(values: tuple[str, ...]) -> bool:
            return any(test(v if cased else v.lower()) for v in values)

        if not fits(spec.domain):
            ctx.notes.append(
                f"{name} {str(value)!r} never occurs in IMMUNE events "
                f"(they give {', '.join(spec.domain)})"
            )
        return fits(spec.constant.get(ctx.kind, ()))
    if cased:
        return _on_text(name, test, lowered=False)
    return _on_text(name, test, lowered=True)


StringPart = str | SpecialChars | Placeholder


def text_test(parts: list[StringPart], *, cased: bool) -> TextTest:
    """A test of a text against a Sigma string (its parts, wildcards included).

    Without ``cased``, the text given to the test must already be lower case.

    Raises:
        UnsupportedError: the string holds a placeholder (``%name%``, from
            the ``expand`` modifier) that nothing defines.
    """
    for part in parts:
        if isinstance(part, Placeholder):
            msg = f"placeholder %{part.name}% is not defined for IMMUNE"
            raise UnsupportedError(msg)
    texts = [p if cased or not isinstance(p, str) else p.lower() for p in parts]
    star = SpecialChars.WILDCARD_MULTI
    if all(isinstance(p, str) for p in texts):
        literal = "".join(str(p) for p in texts)
        return lambda v: v == literal
    if texts == [star]:
        return lambda v: True
    if len(texts) == 3 and texts[0] is star and texts[2] is star:
        middle = texts[1]
        if isinstance(middle, str):
            return lambda v: middle in v
    if len(texts) == 2 and isinstance(texts[0], str) and texts[1] is star:
        prefix = texts[0]
        return lambda v: v.startswith(prefix)
    if len(texts) == 2 and texts[0] is star and isinstance(texts[1], str):
        suffix = texts[1]
        return lambda v: v.endswith(suffix)
    pattern = "".join(_glob_part(p) for p in texts)
    compiled = re2.compile("(?s)" + pattern, options=_options())
    return lambda v: compiled.fullmatch(v) is not None


def _glob_part(part: StringPart) -> str:
    if part is SpecialChars.WILDCARD_MULTI:
        return ".*"
    if part is SpecialChars.WILDCARD_SINGLE:
        return "."
    return str(re2.escape(str(part)))


def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # a refused pattern is reported, not logged by RE2
    return options


def _on_text(name: str, test: TextTest, *, lowered: bool) -> Predicate:
    def leaf(s: Subject) -> bool:
        value = s.lowered(name) if lowered else s.value(name)
        if value is None:
            return False
        if isinstance(value, str):
            return test(value)
        if isinstance(value, tuple):
            return any(test(v) for v in value)
        return test(_as_text(value))

    return leaf


def _as_text(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_REGEX_FLAGS = {
    SigmaRegularExpressionFlag.IGNORECASE: "i",
    SigmaRegularExpressionFlag.MULTILINE: "m",
    SigmaRegularExpressionFlag.DOTALL: "s",
}


def _regex(name: str, value: SigmaRegularExpression) -> Predicate:
    pattern = str(value.regexp)
    flags = "".join(sorted(_REGEX_FLAGS[flag] for flag in value.flags))
    try:
        compiled = re2.compile(
            f"(?{flags}){pattern}" if flags else pattern, options=_options()
        )
    except re2.error as exc:
        reason = exc.args[0].decode() if isinstance(exc.args[0], bytes) else exc
        msg = f"field {name!r}: RE2 cannot compile the regular expression {pattern!r}"
        raise UnsupportedError(f"{msg}: {reason}") from None

    def test(text: str) -> bool:
        return compiled.search(text) is not None

    return _on_text(name, test, lowered=False)


def _cidr(name: str, value: SigmaCIDRExpression) -> Predicate:
    network = value.network

    def test(text: str) -> bool:
        try:
            return ipaddress.ip_address(text) in network
        except ValueError:
            return False

    return _on_text(name, test, lowered=False)


def _number_of(value: Value) -> int | float | None:
    if isinstance(value, bool) or value is None or isinstance(value, tuple):
        return None
    if isinstance(value, int | float):
        return value
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return None


_COMPARE: dict[CompareOperators, Callable[[float, float], bool]] = {
    CompareOperators.LT: lambda a, b: a < b,
    CompareOperators.LTE: lambda a, b: a <= b,
    CompareOperators.GT: lambda a, b: a > b,
    CompareOperators.GTE: lambda a, b: a >= b,
    CompareOperators.NEQ: lambda a, b: a != b,
}


def _compare(name: str, value: SigmaCompareExpression) -> Predicate:
    limit = value.number.number
    op = _COMPARE[value.op]

    def leaf(s: Subject) -> bool:
        number = _number_of(s.value(name))
        return number is not None and op(number, limit)

    return leaf


def _number(name: str, value: SigmaNumber) -> Predicate:
    wanted = value.number
    text = str(wanted)

    def leaf(s: Subject) -> bool:
        found = s.value(name)
        if isinstance(found, str):
            return found == text
        if isinstance(found, tuple):
            return text in found
        if isinstance(found, bool) or found is None:
            return False
        return found == wanted

    return leaf


def _bool(name: str, wanted: bool) -> Predicate:
    text = "true" if wanted else "false"

    def leaf(s: Subject) -> bool:
        found = s.lowered(name)
        if isinstance(found, bool):
            return found is wanted
        return found == text

    return leaf


def _fieldref(name: str, value: SigmaFieldReference, ctx: _Context) -> Predicate:
    other = value.field
    if other not in FIELDS:
        raise UnsupportedError(
            f"field reference {other!r} is not an IMMUNE event field"
        )
    ctx.fields.add(other)
    starts, ends = value.starts_with, value.ends_with

    def leaf(s: Subject) -> bool:
        mine, theirs = s.lowered(name), s.lowered(other)
        if mine is None or theirs is None:
            return False
        a, b = _as_text(mine), _as_text(theirs)
        if starts and ends:
            return b in a
        if starts:
            return a.startswith(b)
        if ends:
            return a.endswith(b)
        return a == b

    return leaf
