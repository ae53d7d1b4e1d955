"""Response actions an agent runs on the hive's signed command.

:data:`ACTIONS` maps an action name to an async function of the command's
arguments returning a result dict; a failure raises :class:`ActionError`.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from immune.errors import ImmuneError

Action = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ActionError(ImmuneError):
    """An action could not be carried out; the message says why."""


async def ping(args: dict[str, Any]) -> dict[str, Any]:
    """Answer that the agent is alive and able to act.

    Args:
        args: ``echo`` (optional) comes back unchanged.
    """
    result: dict[str, Any] = {
        "pong": True,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "ts": time.time_ns(),
    }
    if "echo" in args:
        result["echo"] = args["echo"]
    return result


ACTIONS: dict[str, Action] = {"ping": ping}

__all__ = ["ACTIONS", "Action", "ActionError"]
