"""The agent's side of commands: check each one, run it, acknowledge it.

A command is refused, and the refusal acknowledged with its reason, when it
is larger than 64 KiB (unread, so without acknowledgement), when its
signature is missing or not the hive's, when it has expired or expires too
far ahead, when its id was seen before (a replay: ids are remembered, also
in the spool file across restarts, until their command expires), when it
names another agent or came on a topic that is not for this agent, or when
the action is unknown. Otherwise the agent acknowledges it, runs
``immune.agent.actions.ACTIONS[action](args)`` until the command expires,
and acknowledges again with the result or the error.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiomqtt

from immune import signing, topics
from immune.agent import actions
from immune.agent.spool import Spool
from immune.config import Config
from immune.events import encode, now_ns
from immune.metrics import Metrics
from immune.safe import printable

logger = logging.getLogger(__name__)

#: Largest command message an agent reads; larger ones are refused unread.
MAX_COMMAND_BYTES = 64 * 1024


class CommandRunner:
    """Checks and runs the hive's commands for one agent.

    Args:
        config: ``[agent] command_public_key`` and ``max_command_ttl``.
        agent_id: this agent.
        metrics: ``agent.commands*`` counters.

    Raises:
        ConfigError: the public key file is set but unusable.
    """

    def __init__(self, config: Config, agent_id: str, metrics: Metrics) -> None:
        self.config = config
        self.agent_id = agent_id
        self.metrics = metrics
        path = config.agent.command_public_key
        self.key = signing.load_public_key(path) if path else None
        self._seen: dict[str, int] = {}  # command id -> its expiry (ns)
        self._tasks: set[asyncio.Task[None]] = set()
        self.memory: Spool | None = None

    def attach(self, spool: Spool) -> None:
        """Remember command ids in the spool file too, across restarts."""
        self.memory = spool
        self._seen.update(spool.remembered_commands(now_ns()))

    def submit(self, client: aiomqtt.Client, topic: str, payload: bytes) -> None:
        """Handle a command message in a task of its own."""
        task = asyncio.create_task(self.handle(client, topic, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_idle(self, timeout: float) -> None:
        """Let running commands finish (and acknowledge), for ``timeout`` s."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def handle(self, client: aiomqtt.Client, topic: str, payload: bytes) -> None:
        """Check one command message; run it or refuse it, and acknowledge."""
        self.metrics.inc("agent.commands")
        try:
            command = self.check(topic, payload, now_ns())
        except signing.CommandRefusedError as exc:
            self.metrics.inc("agent.commands_refused")
            logger.warning(
                "Refused command %s: %s.", exc.command_id, printable(exc.reason)
            )
            if exc.command_id is not None:
                await self._ack(client, exc.command_id, "refused", error=exc.reason)
            return
        await self._ack(client, command.id, "acknowledged")
        await self._run(client, command)

    def check(self, topic: str, payload: bytes, now: int) -> signing.Command:
        """The command, if this agent must run it.

        Raises:
            CommandRefusedError: with the reason (see the module's docstring).
        """
        if len(payload) > MAX_COMMAND_BYTES:
            msg = f"command of {len(payload)} bytes exceeds {MAX_COMMAND_BYTES}"
            raise signing.CommandRefusedError(msg)
        command = signing.verify(self.key, payload)
        prefix = self.config.mqtt.topic_prefix
        mine = topics.agent_topic(prefix, self.agent_id, topics.COMMANDS)
        expected = {mine: self.agent_id, topics.broadcast_topic(prefix): "*"}
        if expected.get(topic) != command.agent_id:
            msg = f"command for agent {command.agent_id!r} came on topic {topic}"
            raise signing.CommandRefusedError(msg, command.id)
        if command.expires_ns <= now:
            raise signing.CommandRefusedError("command expired", command.id)
        if command.expires_ns - now > self.config.agent.max_command_ttl * 1e9:
            msg = "command expires too far ahead ([agent] max_command_ttl)"
            raise signing.CommandRefusedError(msg, command.id)
        self._forget(now)
        if command.id in self._seen:
            raise signing.CommandRefusedError("command replayed", command.id)
        self._seen[command.id] = command.expires_ns
        if self.memory is not None:
            self.memory.remember_command(command.id, command.expires_ns)
        if command.action not in actions.ACTIONS:
            msg = f"unknown action {command.action!r}"
            raise signing.CommandRefusedError(msg, command.id)
        return command

    def _forget(self, now: int) -> None:
        # A replay of an expired command is refused as expired, so its id
        # need not be remembered longer.
        for command_id in [i for i, exp in self._seen.items() if exp <= now]:
            del self._seen[command_id]

    async def _run(self, client: aiomqtt.Client, command: signing.Command) -> None:
        action = actions.ACTIONS[command.action]
        timeout = max((command.expires_ns - now_ns()) / 1e9, 0.001)
        try:
            async with asyncio.timeout(timeout):
                result = await action(dict(command.args))
        except actions.ActionError as exc:
            await self._ack(client, command.id, "failed", error=str(exc))
            return
        except TimeoutError:
            await self._ack(client, command.id, "failed", error="command expired")
            return
        except Exception as exc:  # noqa: BLE001 - an action bug must be reported
            logger.exception("Action %s failed unexpectedly.", command.action)
            error = f"{type(exc).__name__}: {exc}"
            await self._ack(client, command.id, "failed", error=error)
            return
        await self._ack(client, command.id, "succeeded", result=result)

    async def _ack(
        self,
        client: aiomqtt.Client,
        command_id: str,
        state: str,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        ack = {
            "v": signing.COMMAND_VERSION,
            "id": command_id,
            "agent_id": self.agent_id,
            "state": state,
            "result": result,
            "error": error[:4096] if error else None,
            "ts": now_ns(),
        }
        topic = topics.agent_topic(
            self.config.mqtt.topic_prefix, self.agent_id, topics.ACKS
        )
        payload = self.ack_payload(ack)
        try:
            await client.publish(topic, payload, qos=1)
        except aiomqtt.MqttError as exc:
            logger.warning("Acknowledgement of %s lost: %s.", command_id, exc)

    def ack_payload(self, ack: dict[str, Any]) -> bytes:
        """The acknowledgement's JSON, in at most ``[agent] batch_max_bytes``.

        Text that is not UTF-8 (a process's argv, environment or file names,
        as the kernel gave them) is sent with its bad bytes as ``\\xNN``.
        A result too large for one message loses the tail of its longest
        lists (``truncated`` says which, and how long they were); one that
        cannot be sent at all becomes a ``failed`` acknowledgement saying why.
        """
        limit = self.config.agent.batch_max_bytes
        try:
            raw = encode(ack)
        except TypeError:  # orjson.JSONEncodeError: text with surrogates, ...
            try:
                ack = {**ack, "result": json_safe(ack["result"])}
                raw = encode(ack)
            except TypeError as exc:
                return self._unsendable(ack, f"result cannot be encoded: {exc}")
        if len(raw) <= limit or not ack["result"]:
            return raw
        self.metrics.inc("agent.results_truncated")
        result = shorten_result(
            ack["result"], limit - (len(raw) - _size(ack["result"]))
        )
        if result is None:
            msg = (
                f"result of {len(raw)} bytes exceeds [agent] batch_max_bytes ({limit})"
            )
            return self._unsendable(ack, msg)
        logger.warning(
            "Result of command %s cut to fit %d bytes: %s.",
            ack["id"],
            limit,
            result["truncated"],
        )
        return encode({**ack, "result": result})

    def _unsendable(self, ack: dict[str, Any], reason: str) -> bytes:
        logger.warning("Command %s: %s.", ack["id"], printable(reason))
        failed = {**ack, "result": None, "error": reason[:4096]}
        if ack["state"] == "succeeded":
            failed["state"] = "failed"
        return encode(failed)


def _size(value: Any) -> int:
    return len(encode(value)) if isinstance(value, dict | list) else 0


def json_safe(value: Any) -> Any:
    """``value`` with every string (keys too) valid UTF-8, bad bytes as ``\\xNN``.

    psutil and os hand back undecodable bytes as lone surrogates
    (``surrogateescape``), which JSON cannot carry.
    """
    if isinstance(value, str):
        try:
            return value.encode("utf-8", "surrogateescape").decode(
                "utf-8", "backslashreplace"
            )
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {json_safe(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def shorten_result(result: dict[str, Any], limit: int) -> dict[str, Any] | None:
    """``result`` with its longest lists and tables halved until it fits.

    Returns:
        The shortened result, ``truncated`` mapping each cut field to its
        length before; None when cutting lists cannot make it fit.
    """
    result, lengths = dict(result), dict[str, int]()
    while _size(result) + 64 * (len(lengths) + 1) > limit:
        cuttable = [
            k for k, v in result.items() if isinstance(v, list | dict) and len(v) > 1
        ]
        if not cuttable:
            return None
        name = max(cuttable, key=lambda k: _size(result[k]))
        value = result[name]
        lengths.setdefault(name, len(value))
        half = len(value) // 2
        result[name] = (
            value[:half]
            if isinstance(value, list)
            else dict(list(value.items())[:half])
        )
    result["truncated"] = lengths
    return result
