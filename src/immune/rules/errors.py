"""The error a rule file or a condition is refused with."""

from __future__ import annotations

from immune.errors import ImmuneError


class RuleError(ImmuneError):
    """A rule file, a rule or a condition is invalid.

    Args:
        reason: what is wrong and, where it helps, how to put it right.
        file: the file at fault, when the condition came from one.
        line: the 1-based line in that file, when known.
    """

    def __init__(
        self, reason: str, *, file: str | None = None, line: int | None = None
    ) -> None:
        self.reason = reason
        self.file = file
        self.line = line
        super().__init__(self._text())

    def _text(self) -> str:
        where = self.file or "<rule>"
        if self.line is not None:
            where = f"{where}:{self.line}"
        return f"{where}: {self.reason}"

    def located(self, file: str | None) -> RuleError:
        """This error with its file filled in, when it has none yet."""
        if self.file is not None or file is None:
            return self
        return RuleError(self.reason, file=file, line=self.line)
