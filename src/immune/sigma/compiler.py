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

from immune.sigma.fields import FIELDS, Subject, Value
from immune.sigma.text import (
    TextLeaf,
    TextTest,
    UnsupportedError,
    as_text,
    options,
    text_shape,
    utf8,
)

Predicate = Callable[[Subject], bool]
#: A compiled node: a predicate, or a constant when it does not depend on the event.
Node = Predicate | bool


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
    return AllOf(preds)


def _any(nodes: list[Node]) -> Node:
    if any(node is True for node in nodes):
        return True
    preds = _merge_leaves([node for node in nodes if not isinstance(node, bool)])
    if not preds:
        return False
    if len(preds) == 1:
        return preds[0]
    return AnyOf(preds)


class AllOf:
    """Predicates that must all hold (kept apart for :func:`required_leaf`)."""

    __slots__ = ("preds",)

    def __init__(self, preds: list[Predicate]) -> None:
        self.preds = preds

    def __call__(self, s: Subject) -> bool:
        for pred in self.preds:
            if not pred(s):
                return False
        return True


class AnyOf:
    """Predicates of which one must hold (kept apart for :func:`required_leaf`)."""

    __slots__ = ("preds",)

    def __init__(self, preds: list[Predicate]) -> None:
        self.preds = preds

    def __call__(self, s: Subject) -> bool:
        for pred in self.preds:
            if pred(s):
                return True
        return False


def required_leaf(node: Node) -> TextLeaf | None:
    """A plain text test the node cannot hold without, for pre-filtering.

    Plain means made of exact, prefix, suffix and substring tests only, so
    that it can join an RE2 set. The executable's is preferred: it is short
    and rules name it most.
    """
    if isinstance(node, TextLeaf):
        return node if not node.others else None
    if isinstance(node, AllOf):
        found = [leaf for pred in node.preds if (leaf := required_leaf(pred))]
        for leaf in found:
            if leaf.name == "exe":
                return leaf
        return found[0] if found else None
    if isinstance(node, AnyOf):
        # Each alternative needs a test of the same field: one of them must hold.
        leaves = [required_leaf(pred) for pred in node.preds]
        plain = [leaf for leaf in leaves if leaf is not None]
        keys = {(leaf.name, leaf.lowered) for leaf in plain}
        if len(plain) == len(leaves) and len(keys) == 1:
            return TextLeaf.merge(plain)
    return None


def _merge_leaves(preds: list[Predicate]) -> list[Predicate]:
    """Alternatives testing the same field become one leaf: one read, C-speed tests."""
    groups: dict[tuple[str, bool], list[TextLeaf]] = {}
    others: list[Predicate] = []
    for pred in preds:
        if isinstance(pred, TextLeaf):
            groups.setdefault((pred.name, pred.lowered), []).append(pred)
        else:
            others.append(pred)
    return [*(TextLeaf.merge(group) for group in groups.values()), *others]


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
    if keyword and isinstance(value, SigmaNumber | SigmaBool):
        # A full-text search finds a number or a boolean as text.
        value = SigmaString(str(value).lower())
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
    shape = text_shape(parts, cased=cased)
    test = shape.test()
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
    return shape.leaf(name, lowered=not cased)


def _on_text(name: str, test: TextTest, *, lowered: bool) -> Predicate:
    return TextLeaf(name, lowered, others=(test,))


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
            f"(?{flags}){pattern}" if flags else pattern, options=options()
        )
    except re2.error as exc:
        reason = exc.args[0].decode() if isinstance(exc.args[0], bytes) else exc
        msg = f"field {name!r}: RE2 cannot compile the regular expression {pattern!r}"
        raise UnsupportedError(f"{msg}: {reason}") from None

    def test(text: str) -> bool:
        return compiled.search(utf8(text)) is not None

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
        a, b = as_text(mine), as_text(theirs)
        if starts and ends:
            return b in a
        if starts:
            return a.startswith(b)
        if ends:
            return a.endswith(b)
        return a == b

    return leaf
