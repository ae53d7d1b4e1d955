"""Rule files: loading, checking, and the set of rules indexed by event kind.

A rule file is YAML with up to four sections, all optional::

    lists:         # named lists of values, for {list: name}
      temp_dirs: [/tmp/, /dev/shm/, /var/tmp/]
    macros:        # named conditions, for macro: name
      in_temp: {exe: {startswith: {list: temp_dirs}}}
    rules:         # detections on single events
      - id: exec-from-temp-dir
        ...
    correlations:  # detections over many events (see correlation.py)
      - id: chain-reverse-shell
        ...

Files are read in order (the shipped defaults first); a file may use the
lists, macros and rules of the files before it and its own. A file is
accepted or refused whole, with the file, line and reason.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import re2

from immune.events import KINDS, SEVERITIES, Event, Severity
from immune.rules import _yaml
from immune.rules.condition import Context, Predicate, compile_condition, kinds_of
from immune.rules.errors import RuleError

if TYPE_CHECKING:
    from immune.rules.correlation import Correlation

logger = logging.getLogger(__name__)

DEFAULT_DIR = Path(__file__).parent / "default"
SECTIONS = ("lists", "macros", "rules", "correlations")
_ID = re2.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_TECHNIQUE = re2.compile(r"^T[0-9]{4}(?:\.[0-9]{3})?$")
RULE_KEYS = frozenset(
    {
        "id",
        "title",
        "description",
        "severity",
        "techniques",
        "enabled",
        "kinds",
        "condition",
        "exceptions",
        "tests",
        "tags",
    }
)


@dataclass(eq=False)
class Rule:
    """A detection on single events."""

    id: str
    title: str
    severity: Severity
    condition: Predicate
    exceptions: tuple[Predicate, ...] = ()
    kinds: frozenset[str] | None = None
    techniques: tuple[str, ...] = ()
    description: str = ""
    enabled: bool = True
    tags: tuple[str, ...] = ()
    file: str | None = None
    line: int | None = None
    tests: list[Any] = field(default_factory=list)
    #: The condition for events of one of ``kinds`` (the test of the kind
    #: left out, since the index already made it); None: ``condition``.
    indexed: Predicate | None = None

    def matches(self, event: Event) -> bool:
        """Whether the event meets the condition and none of the exceptions."""
        if not self.condition(event):
            return False
        return not any(exception(event) for exception in self.exceptions)

    def matches_indexed(self, event: Event) -> bool:
        """:meth:`matches`, for an event whose kind is one of ``kinds``."""
        if not (self.indexed or self.condition)(event):
            return False
        return not any(exception(event) for exception in self.exceptions)


@dataclass
class RuleSet:
    """Rules and correlations, with the rules of each event kind at hand."""

    rules: dict[str, Rule] = field(default_factory=dict)
    correlations: dict[str, Correlation] = field(default_factory=dict)
    lists: dict[str, list[Any]] = field(default_factory=dict)
    macros: dict[str, Any] = field(default_factory=dict)
    #: The text of each accepted file, by path.
    texts: dict[str, str] = field(default_factory=dict)
    #: Files refused when loading with ``strict=False``.
    errors: list[RuleError] = field(default_factory=list)
    _by_kind: dict[str, tuple[Rule, ...]] = field(default_factory=dict)

    def index(self) -> None:
        """Build the per-kind index of enabled rules (after any change)."""
        enabled = [rule for rule in self.rules.values() if rule.enabled]
        self._by_kind = {
            kind: tuple(r for r in enabled if r.kinds is None or kind in r.kinds)
            for kind in KINDS
        }

    def for_kind(self, kind: str) -> tuple[Rule, ...]:
        """The enabled rules that may match an event of this kind."""
        return self._by_kind.get(kind, ())

    def match(self, event: Event) -> list[Rule]:
        """The enabled rules the event matches."""
        return [
            rule for rule in self.for_kind(event.kind) if rule.matches_indexed(event)
        ]


def rule_files(paths: Iterable[str | Path]) -> list[Path]:
    """The rule files named: files as given, directories' ``*.yaml``/``*.yml``.

    Raises:
        RuleError: a path does not exist.
    """
    found: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
        elif path.is_file():
            found.append(path)
        else:
            raise RuleError("no such file or directory", file=str(path))
    return found


def load_rules(
    paths: Iterable[str | Path],
    *,
    strict: bool = True,
    defaults: bool = False,
    fallback: Mapping[str, str] | None = None,
) -> RuleSet:
    """Load rule files (and directories of them) into a :class:`RuleSet`.

    Args:
        paths: files or directories, read in this order.
        strict: raise on the first refused file; else keep going and list
            the refused files in ``RuleSet.errors``.
        defaults: load the shipped default rules first.
        fallback: path to the text last accepted from it: when a file is
            refused, that text is used instead, so that the rules already
            running keep running.

    Raises:
        RuleError: (strict only) the file, line and reason of a refusal.
    """
    ruleset = RuleSet()
    names = [*rule_files([DEFAULT_DIR])] if defaults else []
    try:
        names += rule_files(paths)
    except RuleError as exc:
        if strict:
            raise
        ruleset.errors.append(exc)
    for path in names:
        try:
            text = path.read_text(encoding="utf-8")
            add_text(ruleset, text, str(path))
        except (RuleError, OSError, UnicodeDecodeError) as exc:
            error = _as_rule_error(exc, str(path))
            if strict:
                raise error from None
            ruleset.errors.append(error)
            old = (fallback or {}).get(str(path))
            if old is not None:
                add_text(ruleset, old, str(path))
                logger.warning("Kept the previous version of %s.", path)
    ruleset.index()
    return ruleset


def _as_rule_error(exc: Exception, file: str) -> RuleError:
    if isinstance(exc, RuleError):
        return exc.located(file)
    if isinstance(exc, UnicodeDecodeError):
        return RuleError(f"not UTF-8 text: {exc.reason}", file=file)
    return RuleError(f"cannot read: {exc}", file=file)


def add_text(ruleset: RuleSet, text: str, file: str) -> None:
    """Add one file's lists, macros, rules and correlations, or none of them.

    Raises:
        RuleError: the file is refused; the rule set is unchanged.
    """
    doc = _yaml.load(text, file)
    if doc is None:
        doc = _yaml.Node()
    if not isinstance(doc, Mapping):
        raise RuleError(
            "a rule file must be a mapping of lists, macros, rules, correlations",
            file=file,
            line=_yaml.line_of(doc),
        )
    unknown = [key for key in doc if key not in SECTIONS]
    if unknown:
        reason = f"unknown section {unknown[0]!r} (known: {', '.join(SECTIONS)})"
        raise RuleError(reason, file=file, line=_yaml.line_of(doc, unknown[0]))

    lists = {**ruleset.lists, **_named(doc, "lists", ruleset.lists, file)}
    macros = {**ruleset.macros, **_named(doc, "macros", ruleset.macros, file)}
    context = Context(lists=lists, macros=macros, file=file)
    for name in macros:
        if name not in ruleset.macros:  # check each new macro once, even unused
            compile_condition({"macro": name}, context)
    rules = dict(ruleset.rules)
    for obj in _section_items(doc, "rules", file):
        rule = parse_rule(obj, context)
        _unique(rule.id, rules, ruleset.correlations, obj, file)
        rules[rule.id] = rule
    correlations = dict(ruleset.correlations)
    from immune.rules.correlation import parse_correlation

    for obj in _section_items(doc, "correlations", file):
        corr = parse_correlation(obj, context, rules)
        _unique(corr.id, rules, correlations, obj, file)
        correlations[corr.id] = corr

    ruleset.lists, ruleset.macros = lists, macros
    ruleset.rules, ruleset.correlations = rules, correlations
    ruleset.texts[file] = text


def _unique(
    ident: str, rules: Mapping[str, Any], corrs: Mapping[str, Any], obj: Any, file: str
) -> None:
    if ident in rules or ident in corrs:
        other = rules.get(ident) or corrs.get(ident)
        where = f"{other.file}:{other.line}" if other is not None else "?"
        reason = f"id {ident!r} is already used (at {where}); ids must be unique"
        raise RuleError(reason, file=file, line=_yaml.line_of(obj, "id"))


def _named(
    doc: Mapping[str, Any], section: str, existing: Mapping[str, Any], file: str
) -> dict[str, Any]:
    table = doc.get(section) or {}
    if not isinstance(table, Mapping):
        reason = f"{section}: must be a mapping of names to {section[:-1]}s"
        raise RuleError(reason, file=file, line=_yaml.line_of(doc, section))
    for name, value in table.items():
        line = _yaml.line_of(table, name)
        if not isinstance(name, str) or not _ID.match(name.replace("_", "-")):
            raise RuleError(f"{section}: bad name {name!r}", file=file, line=line)
        if name in existing:
            raise RuleError(
                f"{section}: {name!r} is already defined", file=file, line=line
            )
        if section == "lists":
            _check_list(name, value, file, line)
    return dict(table)


def _check_list(name: str, value: Any, file: str, line: int | None) -> None:
    if not isinstance(value, list) or not value:
        raise RuleError(f"list {name!r} must be a non-empty list", file=file, line=line)
    for item in value:
        if not isinstance(item, str | int | float) or isinstance(item, bool):
            reason = f"list {name!r}: {item!r} is not text or a number"
            raise RuleError(reason, file=file, line=line)


def _section_items(doc: Mapping[str, Any], section: str, file: str) -> list[Any]:
    items = doc.get(section) or []
    if not isinstance(items, list):
        reason = f"{section}: must be a list"
        raise RuleError(reason, file=file, line=_yaml.line_of(doc, section))
    for item in items:
        if not isinstance(item, Mapping):
            reason = f"each of {section} must be a mapping with an id"
            raise RuleError(reason, file=file, line=_yaml.line_of(items))
    return items


# -- one rule -------------------------------------------------------------------


def parse_rule(obj: Mapping[str, Any], context: Context) -> Rule:
    """Check and compile one rule.

    Raises:
        RuleError: naming the line and the key at fault.
    """
    unknown = sorted(str(k) for k in obj if k not in RULE_KEYS)
    if unknown:
        known = ", ".join(sorted(RULE_KEYS))
        reason = f"unknown key {unknown[0]!r} in rule (known: {known})"
        raise context.error(reason, obj, unknown[0])
    ident = check_id(obj, context)
    if "condition" not in obj:
        raise context.error(f"rule {ident!r} has no condition", obj)
    exceptions = obj.get("exceptions") or []
    if not isinstance(exceptions, list):
        raise context.error(
            "exceptions: must be a list of conditions", obj, "exceptions"
        )
    tests = obj.get("tests") or []
    if not isinstance(tests, list):
        raise context.error("tests: must be a list", obj, "tests")
    kinds = check_kinds(obj, context)
    if kinds is None:
        kinds = kinds_of(obj["condition"], context.macros)
    condition = compile_condition(obj["condition"], context)
    return Rule(
        id=ident,
        title=check_text(obj, "title", context, default=ident),
        description=check_text(obj, "description", context, default=""),
        severity=check_severity(obj, context, "medium"),
        techniques=check_techniques(obj, context),
        tags=check_tags(obj, context),
        enabled=check_bool(obj, "enabled", context, True),
        condition=condition,
        exceptions=tuple(compile_condition(e, context) for e in exceptions),
        kinds=kinds,
        file=context.file,
        line=_yaml.line_of(obj),
        tests=list(tests),
        indexed=_without_kind(obj["condition"], kinds, context),
    )


def _without_kind(
    condition: Any, kinds: frozenset[str] | None, context: Context
) -> Predicate | None:
    """The condition less its ``kind`` entry, which events of ``kinds`` meet."""
    if kinds is None or not isinstance(condition, Mapping) or "kind" not in condition:
        return None
    value = condition["kind"]
    if isinstance(value, Mapping):
        # Only a test of membership can go: {kind: {in: [...], startswith: x}}
        # tests more than the index did.
        if len(value) != 1 or not set(value) <= {"equals", "in"}:
            return None
        value = next(iter(value.values()))
    if not (
        isinstance(value, str)
        or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    ):
        return None  # {list: name} and the like: leave the kind test in
    named = kinds_of({"kind": value})
    if named is None or not kinds <= named:
        return None
    rest = {key: value for key, value in condition.items() if key != "kind"}
    if not rest:
        return _always
    return compile_condition(rest, context)


def _always(_event: Event) -> bool:
    return True


def check_id(obj: Mapping[str, Any], context: Context) -> str:
    ident = obj.get("id")
    if not isinstance(ident, str) or not _ID.match(ident):
        reason = (
            f"id {ident!r} must be 1 to 128 lower-case letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
        if isinstance(ident, bool):
            reason += " (YAML reads yes, no, on and off as true or false: quote it)"
        raise context.error(reason, obj, "id" if "id" in obj else None)
    return ident


def check_text(
    obj: Mapping[str, Any], key: str, context: Context, *, default: str
) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str) or len(value) > 4096:
        raise context.error(f"{key}: must be text of at most 4096 characters", obj, key)
    return value


def check_severity(
    obj: Mapping[str, Any], context: Context, default: Severity
) -> Severity:
    value = obj.get("severity", default)
    if value not in SEVERITIES:
        reason = f"severity {value!r} must be one of {', '.join(SEVERITIES)}"
        raise context.error(reason, obj, "severity")
    severity: Severity = value
    return severity


def check_techniques(obj: Mapping[str, Any], context: Context) -> tuple[str, ...]:
    value = obj.get("techniques") or []
    if not isinstance(value, list) or not all(
        isinstance(t, str) and _TECHNIQUE.match(t) for t in value
    ):
        reason = "techniques: must be a list of ATT&CK ids such as T1059 or T1059.004"
        raise context.error(reason, obj, "techniques")
    return tuple(value)


def check_tags(obj: Mapping[str, Any], context: Context) -> tuple[str, ...]:
    value = obj.get("tags") or []
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise context.error("tags: must be a list of text", obj, "tags")
    return tuple(value)


def check_bool(
    obj: Mapping[str, Any], key: str, context: Context, default: bool
) -> bool:
    value = obj.get(key, default)
    if not isinstance(value, bool):
        raise context.error(f"{key}: must be true or false", obj, key)
    return value


def check_kinds(obj: Mapping[str, Any], context: Context) -> frozenset[str] | None:
    if "kinds" not in obj:
        return None
    value = obj["kinds"]
    if not isinstance(value, list) or not value or any(k not in KINDS for k in value):
        reason = f"kinds: must be a list of event kinds ({', '.join(KINDS)})"
        raise context.error(reason, obj, "kinds")
    return frozenset(value)


def event_context(event: Event) -> dict[str, Any]:
    """The fields of an event worth keeping in an alert's data."""
    data: dict[str, Any] = {"kind": event.kind}
    for name in (
        "pid",
        "ppid",
        "uid",
        "euid",
        "old_euid",
        "exe",
        "path",
        "addr",
        "port",
    ):
        value = getattr(event, name)
        if value is not None:
            data[name] = value
    if event.argv:
        data["cmdline"] = " ".join(event.argv)[:1024]
        if "addr" not in data:
            data.update(remote_of(data["cmdline"]))
    return data


def alert_key(event: Event) -> str:
    """What tells one hit of a rule from another on the same agent.

    Repeats with the same key fold into one alert (``hive.raise_alert``): a
    dropper respawning the same reverse shell is one alert that counts, two
    different programs run from /tmp are two alerts.
    """
    if event.kind in ("connect", "bind"):
        return f"{event.addr}:{event.port}"
    if event.argv:
        return " ".join(event.argv)[:512]
    return event.path or event.exe or event.comm or ""


_DEV_TCP = re2.compile(r"/dev/(?:tcp|udp)/([0-9A-Fa-f.:]{2,45})/([0-9]{1,5})")


def remote_of(cmdline: str) -> dict[str, Any]:
    """The remote end named by a /dev/tcp redirection, so that a playbook
    can block it; empty when there is none or it is no IP address."""
    match = _DEV_TCP.search(cmdline)
    if match is None:
        return {}
    try:
        addr = str(ipaddress.ip_address(match.group(1)))
    except ValueError:
        return {}
    port = int(match.group(2))
    return {"addr": addr, "port": port} if 0 < port < 65536 else {"addr": addr}
