"""What every response action shares: its error, argument checks, settings.

Arguments arrive from the hive as a JSON object. Each action declares them
as a :class:`msgspec.Struct`; :func:`parse` turns the dict into one or raises
:class:`ActionError` naming the action and the offending field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from immune.errors import ImmuneError

S = TypeVar("S", bound=msgspec.Struct)

#: The longest a duration may be (seconds): a week.
MAX_DURATION = 7 * 24 * 3600

# Names that end up in cgroup paths, nft scripts and netns paths.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class ActionError(ImmuneError):
    """A response action was refused or failed; the message says why.

    Args:
        message: what went wrong and, where there is one, the way out.
        action: the action's name, when known.
    """

    def __init__(self, message: str, action: str | None = None) -> None:
        super().__init__(f"{action}: {message}" if action else message)
        self.action = action


def parse(action: str, args: Any, kind: type[S]) -> S:
    """The arguments of ``action`` as a ``kind``, checked.

    Raises:
        ActionError: ``args`` is not an object, lacks a field, has an
            unknown one, or a value of the wrong type or out of range.
    """
    if not isinstance(args, dict):
        msg = f"arguments must be a JSON object, got {type(args).__name__}"
        raise ActionError(msg, action)
    try:
        return msgspec.convert(args, kind, strict=True)
    except msgspec.ValidationError as exc:
        raise ActionError(f"bad arguments: {exc}", action) from exc


def check_name(value: str, what: str) -> str:
    """``value`` when it is a plain name (letters, digits, ``_.-``).

    Raises:
        ActionError: it holds anything else, such as ``/`` or a space.
    """
    if not _NAME.fullmatch(value):
        msg = f"{what} {value!r} must be letters, digits, '_', '.' or '-'"
        raise ActionError(msg)
    return value


@dataclass(frozen=True, slots=True)
class Settings:
    """Where the actions keep their state and which host they act on.

    Args:
        state_dir: the vault, its key and the record of frozen and jailed
            processes live here (made 0700).
        cgroup_prefix: the name of IMMUNE's own cgroup under the cgroup v2
            root; processes are moved to ``<prefix>/freeze-<pid>`` or
            ``<prefix>/jail-<pid>``. One path component.
        netns: run nftables inside this named network namespace
            (``/run/netns/<name>``) instead of the agent's own; for tests
            and for containing a container.
        broker: (host, port) of the MQTT broker, always allowed by
            ``isolate``; None when the agent has no broker (isolate then
            needs an explicit ``allow``).
        max_file: the largest file ``quarantine`` takes, in bytes.
    """

    state_dir: Path = Path("/var/lib/immune/agent")
    cgroup_prefix: str = "immune"
    netns: str | None = None
    broker: tuple[str, int] | None = None
    max_file: int = 1 << 30

    def __post_init__(self) -> None:
        check_name(self.cgroup_prefix, "cgroup_prefix")
        if self.netns is not None:
            check_name(self.netns, "netns")
