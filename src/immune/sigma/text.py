"""Text tests of Sigma strings: exact, prefix, suffix, substring, wildcards.

A Sigma string becomes a :class:`Shape` (what it asks of a text), and the
shapes testing one field become one :class:`TextLeaf`, so that a list of
values costs one read of the field and a few C-level string calls. Strings
with other wildcards become an RE2 full match.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import re2
from sigma.types import Placeholder, SpecialChars

from immune.errors import ImmuneError
from immune.sigma.fields import Subject, Value

TextTest = Callable[[str], bool]


class UnsupportedError(ImmuneError):
    """A rule uses something IMMUNE cannot evaluate; the message says what."""


StringPart = str | SpecialChars | Placeholder


@dataclass(frozen=True)
class Shape:
    """What a Sigma string asks of a text.

    Args:
        op: ``eq``, ``contains``, ``startswith``, ``endswith``, ``any`` (a
            lone ``*``) or ``glob`` (other wildcards, as an RE2 pattern).
        literal: the text compared, or the RE2 pattern for ``glob``.
    """

    op: str
    literal: str

    def test(self) -> TextTest:
        """The test as a function of the text (lower-cased unless cased)."""
        literal = self.literal
        if self.op == "eq":
            return lambda v: v == literal
        if self.op == "contains":
            return lambda v: literal in v
        if self.op == "startswith":
            return lambda v: v.startswith(literal)
        if self.op == "endswith":
            return lambda v: v.endswith(literal)
        if self.op == "any":
            return lambda v: True
        compiled = re2.compile("(?s)" + literal, options=options())
        return lambda v: compiled.fullmatch(utf8(v)) is not None

    def leaf(self, name: str, *, lowered: bool) -> TextLeaf:
        """A predicate applying the test to a field."""
        if self.op == "eq":
            return TextLeaf(name, lowered, eq=frozenset([self.literal]))
        if self.op == "startswith":
            return TextLeaf(name, lowered, startswith=(self.literal,))
        if self.op == "endswith":
            return TextLeaf(name, lowered, endswith=(self.literal,))
        if self.op == "contains":
            return TextLeaf(name, lowered, contains=(self.literal,))
        return TextLeaf(name, lowered, others=(self.test(),))


def text_shape(parts: list[StringPart], *, cased: bool) -> Shape:
    """What a Sigma string (its parts, wildcards included) asks of a text.

    Without ``cased``, literals are lower-cased, for texts that are too.

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
        return Shape("eq", "".join(str(p) for p in texts))
    if texts == [star]:
        return Shape("any", "")
    middle = texts[1] if len(texts) == 3 else None
    if texts[0] is star and texts[-1] is star and isinstance(middle, str):
        return Shape("contains", middle)
    if len(texts) == 2 and isinstance(texts[0], str) and texts[1] is star:
        return Shape("startswith", texts[0])
    if len(texts) == 2 and texts[0] is star and isinstance(texts[1], str):
        return Shape("endswith", texts[1])
    return Shape("glob", "".join(_glob_part(p) for p in texts))


def text_test(parts: list[StringPart], *, cased: bool) -> TextTest:
    """A test of a text against a Sigma string; see :func:`text_shape`."""
    return text_shape(parts, cased=cased).test()


class TextLeaf:
    """Tests of one field's text, any of which may hold.

    Alternatives on one field (a list of values, ``1 of`` selections over
    the same field) are merged into one leaf: the field is read once, exact
    values are a set lookup, prefixes and suffixes one ``startswith`` or
    ``endswith`` call on a tuple.

    Args:
        name: the IMMUNE field.
        lowered: whether the field is lower-cased first.
    """

    __slots__ = ("name", "lowered", "eq", "starts", "ends", "contains", "others")

    def __init__(
        self,
        name: str,
        lowered: bool,
        *,
        eq: frozenset[str] = frozenset(),
        startswith: tuple[str, ...] = (),
        endswith: tuple[str, ...] = (),
        contains: tuple[str, ...] = (),
        others: tuple[TextTest, ...] = (),
    ) -> None:
        self.name = name
        self.lowered = lowered
        self.eq = eq
        self.starts = startswith
        self.ends = endswith
        self.contains = contains
        self.others = others

    @classmethod
    def merge(cls, leaves: list[TextLeaf]) -> TextLeaf:
        """One leaf true when any of the given ones (same field and case) is."""
        if len(leaves) == 1:
            return leaves[0]
        first = leaves[0]
        return cls(
            first.name,
            first.lowered,
            eq=frozenset().union(*(leaf.eq for leaf in leaves)),
            startswith=tuple(p for leaf in leaves for p in leaf.starts),
            endswith=tuple(p for leaf in leaves for p in leaf.ends),
            contains=tuple(p for leaf in leaves for p in leaf.contains),
            others=tuple(t for leaf in leaves for t in leaf.others),
        )

    def pattern(self) -> str:
        """The tests as one RE2 pattern (for a leaf without ``others``)."""
        parts = [f"^{re2.escape(t)}$" for t in sorted(self.eq)]
        parts += [f"^{re2.escape(t)}" for t in self.starts]
        parts += [f"{re2.escape(t)}$" for t in self.ends]
        parts += [str(re2.escape(t)) for t in self.contains]
        return "(?s)" + "|".join(f"(?:{part})" for part in parts)

    def test(self, text: str) -> bool:
        """Whether the text passes any of the tests."""
        if text in self.eq:
            return True
        if self.ends and text.endswith(self.ends):
            return True
        if self.starts and text.startswith(self.starts):
            return True
        for part in self.contains:
            if part in text:
                return True
        return any(test(text) for test in self.others)

    def __call__(self, s: Subject) -> bool:
        value = s.lowered(self.name) if self.lowered else s.value(self.name)
        if value is None:
            return False
        if isinstance(value, str):
            return self.test(value)
        if isinstance(value, tuple):
            return any(self.test(v) for v in value)
        return self.test(as_text(value))


def _glob_part(part: StringPart) -> str:
    if part is SpecialChars.WILDCARD_MULTI:
        return ".*"
    if part is SpecialChars.WILDCARD_SINGLE:
        return "."
    return str(re2.escape(str(part)))


def options() -> re2.Options:
    """RE2 options for IMMUNE's patterns: errors are reported, not logged."""
    found = re2.Options()
    found.log_errors = False
    return found


def utf8(text: str) -> str:
    """The text as RE2 takes it: lone surrogates (not UTF-8) escaped, ``\\udNNN``."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def as_text(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
