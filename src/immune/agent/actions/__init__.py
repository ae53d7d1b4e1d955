"""Response actions the hive can command an agent to take.

``ACTIONS`` maps each action's name to an async function of the command's
``args`` returning a result dict; a failure raises :class:`ActionError`.
The functions act through the current :class:`Responder`, which
:func:`configure` replaces (the agent sets its state directory and broker;
tests point nftables into a network namespace of their own).

==========  ==============================================  ==============
action      what it does                                    undone by
==========  ==============================================  ==============
ping        answers, with the agent's pid and clock
kill        signals a process or its whole tree
freeze      moves a process to its own cgroup, frozen       thaw
jail        own cgroup, no network (nftables)               release
isolate     host network cut but for the broker             unisolate
block       drops an address, network or port               unblock
quarantine  moves a file into the encrypted vault           restore
collect     evidence of a process
policy      hands a new local policy to the agent's hook
==========  ==============================================  ==============
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from immune.agent.actions.base import ActionError, Settings
from immune.agent.actions.responder import PolicyHandler, Responder
from immune.safe import printable

__all__ = [
    "ACTIONS",
    "ActionError",
    "Responder",
    "Settings",
    "configure",
    "current",
    "set_policy_handler",
]

logger = logging.getLogger(__name__)

Action = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

NAMES = (
    "ping", "kill", "freeze", "thaw", "jail", "release", "isolate",
    "unisolate", "block", "unblock", "quarantine", "restore", "collect",
    "policy",
)  # fmt: skip

_current = Responder()


def current() -> Responder:
    """The responder ``ACTIONS`` act through."""
    return _current


def configure(responder: Responder) -> Responder:
    """Make ``ACTIONS`` act through ``responder``; returns the previous one.

    The policy handler, if one was set, moves over to the new responder.
    """
    global _current
    previous, _current = _current, responder
    if responder.policy_handler is None:
        responder.policy_handler = previous.policy_handler
    return previous


def set_policy_handler(handler: PolicyHandler | None) -> None:
    """Have the ``policy`` action call ``handler(args)``.

    Args:
        handler: a function (or coroutine function) of the new policy that
            applies it and returns a result dict; None to refuse ``policy``.
    """
    _current.policy_handler = handler


def _bound(name: str) -> Action:
    async def action(args: dict[str, Any]) -> dict[str, Any]:
        responder = _current
        method: Action = getattr(responder, name)
        try:
            result = await method(args)
        except ActionError as exc:
            responder.metrics.inc("agent.actions_failed")
            logger.warning("Action %s refused or failed: %s.", name, printable(exc))
            raise
        responder.metrics.inc("agent.actions_done")
        return result

    action.__name__ = action.__qualname__ = name
    return action


ACTIONS: dict[str, Action] = {name: _bound(name) for name in NAMES}
