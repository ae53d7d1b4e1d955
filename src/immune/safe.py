"""Making untrusted text safe to show.

Event fields come from hosts an attacker may control. Before such text goes
into a log line or a terminal, control characters (newlines that would forge
log lines, escape sequences that would drive a terminal) are shown escaped.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: object, limit: int = 512) -> str:
    """``text`` as one line with control characters escaped, cut at ``limit``.

    Args:
        text: anything; non-strings are converted with ``str``.
        limit: the longest result, not counting the ``…`` that marks a cut.
    """
    value = str(text)
    if len(value) > limit:
        value = value[:limit] + "…"
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), value)
