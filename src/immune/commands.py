"""Commands to agents, as they cross the bus (``command.send``).

Detection and response code never talks to agents: it publishes a command on
``command.send`` and the transport delivers it, signed, and reports its
progress on ``command.state``. This module builds those messages and checks
their arguments, since they are made from alert data that came from hosts an
attacker may control: a pid must be an integer in range, a path absolute and
free of NUL bytes, an address a real IP address or network.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from immune import signing
from immune.agent import actions
from immune.errors import ImmuneError
from immune.events import new_id, now_ns

SEND = "command.send"
STATE = "command.state"

#: Every action an agent knows (``immune.agent.actions.ACTIONS``).
ACTIONS = frozenset(actions.NAMES)
#: States a command ends in; ``sent`` and ``acknowledged`` are on the way.
FINAL_STATES = frozenset(signing.FINAL_STATES)
STATES = frozenset(signing.STATES)
#: Stateful actions and the action that undoes each.
REVERTS = {"isolate": "unisolate", "block": "unblock", "freeze": "thaw"}

MAX_PID = 2**31 - 1
MAX_PATH = 4096


class CommandError(ImmuneError):
    """A command could not be built: unknown action or an invalid argument."""


def check_pid(value: Any) -> int:
    """A process id: an integer from 1 to 2**31-1 (a string of digits too)."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CommandError(f"pid must be an integer, got {value!r}")
    if not 1 <= value <= MAX_PID:
        raise CommandError(f"pid {value} is out of range 1..{MAX_PID}")
    return value


def check_path(value: Any) -> str:
    """An absolute path without NUL bytes or ``..`` parts."""
    if not isinstance(value, str) or not value.startswith("/"):
        raise CommandError(f"path must be an absolute path, got {value!r}")
    if "\x00" in value or len(value) > MAX_PATH:
        raise CommandError("path holds a NUL byte or is longer than 4096")
    if ".." in value.split("/"):
        raise CommandError(f"path {value!r} holds '..'")
    return value


def check_addr(value: Any) -> str:
    """An IPv4 or IPv6 address or network, in its normal form."""
    if not isinstance(value, str):
        raise CommandError(f"addr must be an IP address, got {value!r}")
    try:
        if "/" in value:
            return str(ipaddress.ip_network(value, strict=False))
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise CommandError(f"addr {value!r} is not an IP address") from None


def check_port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise CommandError(f"port must be an integer 1..65535, got {value!r}")
    return value


def check_seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise CommandError(f"duration must be a positive number, got {value!r}")
    return float(value)


_CHECKS = {
    "pid": check_pid,
    "path": check_path,
    "addr": check_addr,
    "port": check_port,
    "duration_s": check_seconds,
}


def check_args(action: str, args: dict[str, Any]) -> dict[str, Any]:
    """Validate a command's arguments; returns them normalised.

    Known keys (``pid``, ``path``, ``addr``, ``port``, ``duration_s``) are
    checked; other keys must be plain JSON scalars or lists of them.

    Raises:
        CommandError: naming the action and the argument at fault.
    """
    if action not in ACTIONS:
        known = ", ".join(sorted(ACTIONS))
        raise CommandError(f"unknown action {action!r}; known: {known}")
    clean: dict[str, Any] = {}
    for key, value in args.items():
        check = _CHECKS.get(key)
        try:
            clean[key] = check(value) if check else _plain(key, value)
        except CommandError as exc:
            raise CommandError(f"{action}: {exc}") from None
    _require(action, clean)
    return clean


def _plain(key: str, value: Any) -> Any:
    scalar = str | int | float | bool | None
    if isinstance(value, scalar):
        return value
    if isinstance(value, list) and all(isinstance(v, scalar) for v in value):
        return value
    raise CommandError(f"argument {key!r} must be a JSON scalar or list")


_REQUIRED = {"kill": "pid", "quarantine": "path", "block": "addr", "unblock": "addr"}


def _require(action: str, args: dict[str, Any]) -> None:
    needed = _REQUIRED.get(action)
    if needed and needed not in args:
        raise CommandError(f"{action} needs a {needed!r} argument")


def make_command(
    agent_id: str,
    action: str,
    args: dict[str, Any],
    *,
    origin: str,
    alert_id: str | None = None,
    ttl_s: float = 60.0,
) -> dict[str, Any]:
    """A ``command.send`` message, its arguments validated.

    Args:
        agent_id: the agent that must act, or ``"*"`` for all.
        action: one of :data:`ACTIONS`.
        args: the action's arguments (see :func:`check_args`).
        origin: the plugin that decided it.
        alert_id: the alert behind it, if any.
        ttl_s: seconds the agent has to carry it out.

    Raises:
        CommandError: an unknown action or an invalid argument.
    """
    return {
        "id": new_id(),
        "agent_id": agent_id,
        "action": action,
        "args": check_args(action, args),
        "expires_ns": now_ns() + int(ttl_s * 1e9),
        "origin": origin,
        "alert_id": alert_id,
    }
