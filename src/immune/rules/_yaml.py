"""YAML that remembers where things are, so errors can name a line.

Mappings load as :class:`Node` (a dict) and sequences as :class:`Seq` (a
list), each with the 1-based line it starts on and the line of each key or
item. Duplicate keys, which plain YAML loaders keep silently (the last one
wins), are refused: in a rule they are nearly always a mistake.
"""

from __future__ import annotations

from typing import Any

import yaml

from immune.rules.errors import RuleError


class Node(dict[Any, Any]):
    """A YAML mapping with line numbers (1-based)."""

    line: int | None = None
    key_lines: dict[Any, int]

    def line_of(self, key: Any) -> int | None:
        """The line of ``key``, or of the mapping when the key is unknown."""
        lines = getattr(self, "key_lines", {})
        return lines.get(key, self.line)


class Seq(list[Any]):
    """A YAML sequence with line numbers (1-based)."""

    line: int | None = None
    item_lines: list[int]

    def line_of(self, index: int) -> int | None:
        lines = getattr(self, "item_lines", [])
        return lines[index] if index < len(lines) else self.line


def line_of(obj: Any, key: Any = None) -> int | None:
    """The line of ``obj`` (or of its ``key``), when it came from a file."""
    if isinstance(obj, Node | Seq):
        return obj.line if key is None else obj.line_of(key)
    return None


class _Loader(yaml.SafeLoader):
    """A safe loader (no Python objects) that records lines."""


def _mapping(loader: _Loader, node: yaml.MappingNode) -> Node:
    result = Node()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str | int | float | bool) and key is not None:
            line = key_node.start_mark.line + 1
            raise RuleError("a mapping key must be a plain value", line=line)
        if key in result:
            line = key_node.start_mark.line + 1
            raise RuleError(f"duplicate key {key!r}", line=line)
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


def _sequence(loader: _Loader, node: yaml.SequenceNode) -> Seq:
    result = Seq(loader.construct_object(item, deep=True) for item in node.value)
    result.line = node.start_mark.line + 1
    result.item_lines = [item.start_mark.line + 1 for item in node.value]
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _sequence)


def load(text: str, file: str | None = None) -> Any:
    """Parse one YAML document with line numbers.

    Raises:
        RuleError: the text is not YAML, or has duplicate keys.
    """
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except RuleError as exc:
        raise exc.located(file) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        reason = f"not valid YAML: {exc.problem or exc.context}"
        raise RuleError(reason, file=file, line=line) from None
    except yaml.YAMLError as exc:
        raise RuleError(f"not valid YAML: {exc}", file=file) from None
