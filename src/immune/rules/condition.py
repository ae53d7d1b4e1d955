"""Conditions over event fields, compiled once into plain functions.

A condition is a mapping. Each key is either an event field, whose value says
what the field must be, or one of ``all``, ``any``, ``not`` and ``macro``;
every entry of the mapping must hold. For a field the value is a scalar
(equals), a list (one of) or a mapping of operators, all of which must hold::

    exe: {startswith: [/tmp/, /dev/shm/]}
    port: {in: {list: blocked_ports}}
    any:
      - cmdline: {regex: '/dev/tcp/'}
      - not: {uid: 0}

Regular expressions use RE2, whose matching time is linear in the input, so
no rule can make the hive hang. See ``docs/rules.md`` for every operator.
"""

from __future__ import annotations

import ipaddress
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import re2

from immune.events import KINDS, Event
from immune.rules._yaml import line_of
from immune.rules.errors import RuleError

Predicate = Callable[[Event], bool]
Getter = Callable[[Event], Any]

NUMBER_FIELDS = frozenset(
    {"ts", "v", "pid", "ppid", "uid", "euid", "old_euid", "port", "exit_code"}
)
TEXT_FIELDS = frozenset(
    {
        "id",
        "agent_id",
        "host",
        "kind",
        "comm",
        "exe",
        "exe_name",
        "cwd",
        "path",
        "addr",
        "family",
        "outcome",
        "severity",
        "sensor",
        "cmdline",
    }
)
LIST_FIELDS = frozenset({"argv"})
FIELDS = NUMBER_FIELDS | TEXT_FIELDS | LIST_FIELDS
COMBINATORS = frozenset({"all", "any", "not", "macro"})
TEXT_OPS = frozenset({"contains", "startswith", "endswith", "regex"})
NUMBER_OPS = frozenset({"lt", "le", "gt", "ge"})
OPERATORS = TEXT_OPS | NUMBER_OPS | {"equals", "in", "cidr", "exists"}
_COMPARE = {"lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge}


@dataclass
class Context:
    """What a condition may refer to, and where it came from.

    Args:
        lists: named lists, for ``{list: name}`` values.
        macros: named conditions, for ``macro: name``.
        file: the file the condition is read from, for error messages.
    """

    lists: Mapping[str, list[Any]] = field(default_factory=dict)
    macros: Mapping[str, Any] = field(default_factory=dict)
    file: str | None = None
    _compiled: dict[str, Predicate] = field(default_factory=dict)
    _expanding: list[str] = field(default_factory=list)

    def error(self, reason: str, obj: Any = None, key: Any = None) -> RuleError:
        return RuleError(reason, file=self.file, line=line_of(obj, key))


def compile_condition(obj: Any, context: Context | None = None) -> Predicate:
    """Compile a condition into a function of an event.

    Args:
        obj: the condition, as loaded from YAML (a mapping).
        context: named lists and macros, and the file for error messages.

    Raises:
        RuleError: naming the line and what is wrong.
    """
    return _condition(obj, context or Context())


def _condition(obj: Any, ctx: Context) -> Predicate:
    if not isinstance(obj, Mapping):
        hint = "; use all: or any: to combine a list" if isinstance(obj, list) else ""
        raise ctx.error(f"a condition must be a mapping, got {_type(obj)}{hint}", obj)
    if not obj:
        raise ctx.error("a condition must not be empty", obj)
    parts = [_entry(obj, key, value, ctx) for key, value in obj.items()]
    return _all(parts)


def _entry(parent: Any, key: Any, value: Any, ctx: Context) -> Predicate:
    if key in ("all", "any"):
        if not isinstance(value, list) or not value:
            raise ctx.error(f"{key}: takes a non-empty list of conditions", parent, key)
        parts = [_condition(item, ctx) for item in value]
        return _all(parts) if key == "all" else _any(parts)
    if key == "not":
        inner = _condition(value, ctx)
        return lambda event: not inner(event)
    if key == "macro":
        return _macro(parent, value, ctx)
    if not isinstance(key, str) or not _known_field(key):
        raise ctx.error(_unknown_field(key), parent, key)
    return _field(parent, key, value, ctx)


def _macro(parent: Any, name: Any, ctx: Context) -> Predicate:
    if not isinstance(name, str) or name not in ctx.macros:
        known = ", ".join(sorted(ctx.macros)) or "none defined"
        raise ctx.error(f"unknown macro {name!r} (known: {known})", parent, "macro")
    if name in ctx._compiled:
        return ctx._compiled[name]
    if name in ctx._expanding:
        loop = " -> ".join([*ctx._expanding, name])
        raise ctx.error(f"macro {name!r} refers to itself: {loop}", parent, "macro")
    ctx._expanding.append(name)
    try:
        compiled = _condition(ctx.macros[name], ctx)
    finally:
        ctx._expanding.pop()
    ctx._compiled[name] = compiled
    return compiled


# -- fields -------------------------------------------------------------------


def _known_field(name: str) -> bool:
    return name in FIELDS or (name.startswith("extra.") and len(name) > 6)


def _unknown_field(key: Any) -> str:
    return (
        f"unknown field {key!r}: use an event field ({', '.join(sorted(FIELDS))}), "
        "extra.<name>, or all/any/not/macro"
    )


def getter(name: str) -> Getter:
    """A function reading the field ``name`` (see :data:`FIELDS`) of an event."""
    if name == "cmdline":
        return _cmdline
    if name == "exe_name":
        return _exe_name
    if name.startswith("extra."):
        key = name[6:]
        return lambda event: event.extra.get(key) if event.extra else None
    return operator.attrgetter(name)


def _cmdline(event: Event) -> str | None:
    if event.argv:
        return " ".join(event.argv)
    return event.exe


def _exe_name(event: Event) -> str | None:
    return event.exe.rpartition("/")[2] if event.exe else None


def _field(parent: Any, name: str, spec: Any, ctx: Context) -> Predicate:
    if isinstance(spec, Mapping) and set(spec) - {"list"}:
        ops = spec
    elif isinstance(spec, list) or (isinstance(spec, Mapping) and "list" in spec):
        ops = {"in": spec}
    elif spec is None:
        ops = {"exists": False}
    else:
        ops = {"equals": spec}
    where = spec if isinstance(spec, Mapping) else parent
    parts = []
    for op, value in ops.items():
        if op not in OPERATORS:
            known = ", ".join(sorted(OPERATORS))
            raise ctx.error(
                f"{name}: unknown operator {op!r} (known: {known})", where, op
            )
        parts.append(_leaf(name, op, value, ctx, where))
    return _all(parts)


# -- operators ----------------------------------------------------------------


def _leaf(name: str, op: str, value: Any, ctx: Context, where: Any) -> Predicate:
    get = getter(name)
    if op == "exists":
        if not isinstance(value, bool):
            raise ctx.error(f"{name}: exists takes true or false", where, op)
        return _exists(get, value)
    values = _values(name, op, value, ctx, where)
    if name in LIST_FIELDS:
        test = _test(name, op, values, ctx, where)
        return lambda event: any(test(item) for item in get(event) or ())
    if name in TEXT_FIELDS and op in TEXT_OPS - {"regex"}:
        # An event's text fields hold text or None, never another type:
        # the test reads the field itself, one call less per event.
        return _text_leaf(get, op, tuple(values))
    test = _test(name, op, values, ctx, where)
    return lambda event: test(get(event))


def _text_leaf(get: Getter, op: str, strings: tuple[str, ...]) -> Predicate:
    if op == "startswith":
        return lambda event: (v := get(event)) is not None and v.startswith(strings)
    if op == "endswith":
        return lambda event: (v := get(event)) is not None and v.endswith(strings)
    if len(strings) == 1:
        needle = strings[0]
        return lambda event: (v := get(event)) is not None and needle in v
    return lambda event: (v := get(event)) is not None and any(s in v for s in strings)


def _exists(get: Getter, wanted: bool) -> Predicate:
    if wanted:
        return lambda event: get(event) is not None
    return lambda event: get(event) is None


def _values(name: str, op: str, value: Any, ctx: Context, where: Any) -> list[Any]:
    """The operand(s) of an operator, with named lists expanded and checked."""
    if isinstance(value, Mapping):
        if set(value) != {"list"}:
            raise ctx.error(
                f"{name}: {op} takes a value, a list or {{list: name}}", where, op
            )
        list_name = value["list"]
        if list_name not in ctx.lists:
            known = ", ".join(sorted(ctx.lists)) or "none defined"
            raise ctx.error(f"unknown list {list_name!r} (known: {known})", where, op)
        values = list(ctx.lists[list_name])
    elif isinstance(value, list):
        values = list(value)
    else:
        values = [value]
    if not values:
        raise ctx.error(f"{name}: {op} needs at least one value", where, op)
    if len(values) > 1 and op in NUMBER_OPS:
        raise ctx.error(f"{name}: {op} takes one number", where, op)
    if op == "equals" and isinstance(value, list):
        raise ctx.error(
            f"{name}: equals takes one value; use in: for a list", where, op
        )
    _check_types(name, op, values, ctx, where)
    return values


def _check_types(
    name: str, op: str, values: list[Any], ctx: Context, where: Any
) -> None:
    numeric = name in NUMBER_FIELDS
    textual = name in TEXT_FIELDS or name in LIST_FIELDS
    for value in values:
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if op in NUMBER_OPS and not is_number:
            raise ctx.error(f"{name}: {op} takes a number, got {value!r}", where, op)
        if op in TEXT_OPS | {"cidr"} and not isinstance(value, str):
            raise ctx.error(f"{name}: {op} takes text, got {value!r}", where, op)
        if numeric and (op in TEXT_OPS | {"cidr"} or not is_number):
            raise ctx.error(
                f"{name} is a number: {op} {value!r} can never match", where, op
            )
        if textual and (op in NUMBER_OPS or not isinstance(value, str)):
            raise ctx.error(
                f"{name} is text: {op} {value!r} can never match", where, op
            )
    if name == "kind" and op in ("equals", "in"):
        unknown = [v for v in values if v not in KINDS]
        if unknown:
            raise ctx.error(
                f"unknown event kind {unknown[0]!r} (known: {', '.join(KINDS)})",
                where,
                op,
            )


def _test(
    name: str, op: str, values: list[Any], ctx: Context, where: Any
) -> Callable[[Any], bool]:
    """A test of one field value; it is false for a missing or mistyped value."""
    if op in ("equals", "in"):
        return _member(values)
    if op in NUMBER_OPS:
        return _compare(op, values[0])
    if op == "cidr":
        return _cidr(name, values, ctx, where)
    if op == "regex":
        return _regex(name, values, ctx, where)
    strings = tuple(values)
    if op == "startswith":
        return lambda v: isinstance(v, str) and v.startswith(strings)
    if op == "endswith":
        return lambda v: isinstance(v, str) and v.endswith(strings)
    if len(strings) == 1:
        needle = strings[0]
        return lambda v: isinstance(v, str) and needle in v
    return lambda v: isinstance(v, str) and any(s in v for s in strings)


def _member(values: list[Any]) -> Callable[[Any], bool]:
    if all(type(v) is str for v in values):
        # Text equals only text: the set's own lookup, no Python frame.
        return frozenset(values).__contains__
    # Booleans are ints to Python: keep True from matching 1.
    chosen = frozenset((type(v) is bool, v) for v in values)
    return lambda v: v is not None and (type(v) is bool, v) in chosen


def _compare(op: str, bound: float) -> Callable[[Any], bool]:
    compare = _COMPARE[op]

    def test(value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        return bool(compare(value, bound))

    return test


def _cidr(
    name: str, values: list[str], ctx: Context, where: Any
) -> Callable[[Any], bool]:
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError as exc:
            raise ctx.error(
                f"{name}: cidr {value!r} is not a network: {exc}", where, "cidr"
            ) from None

    def test(value: Any) -> bool:
        address = _address(value) if isinstance(value, str) else None
        return address is not None and any(address in net for net in networks)

    return test


@lru_cache(maxsize=4096)
def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


def compile_regex(pattern: str) -> Any:
    """Compile with RE2; raises ``re2.error`` for what RE2 refuses."""
    return re2.compile(pattern, options=_RE2_OPTIONS)


def _regex(
    name: str, values: list[str], ctx: Context, where: Any
) -> Callable[[Any], bool]:
    for value in values:
        try:
            compile_regex(value)
        except re2.error as exc:
            why = exc.args[0] if exc.args else exc
            why = why.decode(errors="replace") if isinstance(why, bytes) else why
            reason = f"{name}: regex {value!r} is refused by RE2: {why}"
            raise ctx.error(reason, where, "regex") from None
    # Whether any pattern is found, asked of an RE2 set: one call into RE2,
    # without the match object (and its offsets) that search() builds.
    patterns = re2.Set.SearchSet(_RE2_OPTIONS)
    for value in values:
        patterns.Add(value)
    patterns.Compile()
    match = patterns.Match
    return lambda v: isinstance(v, str) and match(v) is not None


# -- combining ----------------------------------------------------------------


def _all(parts: list[Predicate]) -> Predicate:
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        first, second = parts
        return lambda event: first(event) and second(event)
    return lambda event: all(part(event) for part in parts)


def _any(parts: list[Predicate]) -> Predicate:
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        first, second = parts
        return lambda event: first(event) or second(event)
    return lambda event: any(part(event) for part in parts)


def _type(obj: Any) -> str:
    if isinstance(obj, list):
        return "a list"
    if obj is None:
        return "nothing"
    return f"{type(obj).__name__} {obj!r}"


def kinds_of(
    obj: Any, macros: Mapping[str, Any] | None = None
) -> frozenset[str] | None:
    """The event kinds a condition can match, when it says (None: any kind).

    Args:
        obj: a condition that compiled (so its macros have no loops).
        macros: the macros it may use.
    """
    if not isinstance(obj, Mapping):
        return None
    found: frozenset[str] | None = None
    for key, value in obj.items():
        kinds = _kinds_entry(key, value, macros or {})
        if kinds is not None:
            found = kinds if found is None else found & kinds
    return found


def _kinds_entry(
    key: Any, value: Any, macros: Mapping[str, Any]
) -> frozenset[str] | None:
    if key == "macro" and isinstance(value, str) and value in macros:
        return kinds_of(macros[value], macros)
    if key == "kind":
        if isinstance(value, str):
            return frozenset({value})
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return frozenset(value)
        if isinstance(value, Mapping):
            for op in ("equals", "in"):
                inner = value.get(op)
                if isinstance(inner, str):
                    return frozenset({inner})
                if isinstance(inner, list):
                    return frozenset(inner)
        return None
    if key == "all" and isinstance(value, list):
        results = [k for k in (kinds_of(v, macros) for v in value) if k is not None]
        return frozenset.intersection(*results) if results else None
    if key == "any" and isinstance(value, list):
        options = [kinds_of(item, macros) for item in value]
        if options and all(k is not None for k in options):
            return frozenset().union(*(k for k in options if k is not None))
    return None
