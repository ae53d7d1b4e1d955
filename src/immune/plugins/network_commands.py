"""The network plugin's command desk: bus commands out to agents, acks back.

Takes ``command.send`` from the bus, records the command in the
``commands`` table, signs it with the hive's Ed25519 key and publishes it to
one agent or to all; takes the agents' acknowledgements, records each state
and publishes ``command.state`` on the bus; and marks as ``timed_out`` the
commands whose expiry passed with no final answer.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING, Any

import aiomqtt
import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from immune import signing, topics
from immune.config import state_dir
from immune.errors import EventError
from immune.events import Ident, now_ns

if TYPE_CHECKING:
    from immune.hive import Hive

logger = logging.getLogger(__name__)

#: States of a command that has its agent's final answer.
ANSWERED = ("succeeded", "failed", "refused")
#: Seconds between two looks for commands that expired unanswered.
EXPIRY_CHECK_INTERVAL = 1.0


class CommandRequest(msgspec.Struct, kw_only=True):
    """A ``command.send`` message of the bus contract."""

    id: Ident
    agent_id: signing.Target
    action: str
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    expires_ns: int
    origin: str = ""
    alert_id: str | None = None


#: The longest duration an agent takes (``immune.agent.actions.base``).
MAX_DURATION = 7 * 24 * 3600
#: Seconds past ``duration_s`` after which the agent undoes an action itself.
UNDO_MARGIN = 60


def agent_args(action: str, args: dict[str, Any]) -> dict[str, Any]:
    """A command's arguments in the agent's words (``docs/actions.md``).

    The hive's playbooks and response plugin (:mod:`immune.commands`) say
    ``addr`` and ``duration_s`` (seconds, a number) and note the alert in
    ``alert_id``; the agent's actions take ``address`` and ``duration`` (whole
    seconds) and refuse unknown fields. The alert stays in the command's row.
    The response plugin undoes an action when ``duration_s`` is up; the
    agent is told to undo it itself ``UNDO_MARGIN`` seconds later, in case
    the hive is gone by then. A ``block`` or ``unblock`` of an address and a
    port (an alert's remote endpoint) blocks the address, which holds the
    port too.
    """
    out = dict(args)
    out.pop("alert_id", None)
    if "addr" in out and "address" not in out:
        out["address"] = out.pop("addr")
    seconds = out.pop("duration_s", None)
    if isinstance(seconds, int | float) and not isinstance(seconds, bool):
        duration = max(math.ceil(seconds), 1) + UNDO_MARGIN
        out.setdefault("duration", min(duration, MAX_DURATION))
    if action in ("block", "unblock") and "address" in out:
        out.pop("port", None)
    if action == "unblock":
        out.pop("duration", None)  # the agent refuses one there
    return out


class CommandDesk:
    """Sends, records and follows the hive's commands.

    Args:
        hive: the running hive.
        client: a callable returning the connected MQTT client, or None.
    """

    def __init__(self, hive: Hive, client: Any) -> None:
        self.hive = hive
        self._client = client
        self.prefix = hive.config.mqtt.topic_prefix
        self._key: Ed25519PrivateKey | None = None

    @property
    def key(self) -> Ed25519PrivateKey:
        """The hive's signing key, read (or made) on first use.

        Raises:
            ConfigError: the key file is unusable (see
                :func:`immune.signing.load_or_create_key`).
        """
        if self._key is None:
            path = self.hive.config.hive.command_key or state_dir() / "command.key"
            self._key = signing.load_or_create_key(path)
        return self._key

    def check_key(self) -> None:
        """Read (or make) the signing key now, raising if it is unusable."""
        self._key = None
        _ = self.key

    async def send(self, message: Any) -> None:
        """Bus handler of ``command.send``: sign, publish and record."""
        hive = self.hive
        try:
            request = msgspec.convert(message, CommandRequest)
        except msgspec.ValidationError as exc:
            hive.metrics.inc("commands.invalid")
            await hive.dead_letter(
                "command.send", f"invalid command: {exc}", raw=message
            )
            return
        await hive.store.add_command(
            request.agent_id,
            request.action,
            request.args,
            command_id=request.id,
            expires_ns=request.expires_ns,
            origin=request.origin or None,
            alert_id=request.alert_id,
        )
        if request.expires_ns <= now_ns():
            await self._state(request.id, request.agent_id, request.action, "timed_out")
            return
        client = self._client()
        if client is None:
            error = "the hive is not connected to the MQTT broker"
            await self._state(
                request.id, request.agent_id, request.action, "failed", error=error
            )
            return
        await self._publish(client, request)

    async def _publish(self, client: aiomqtt.Client, request: CommandRequest) -> None:
        command = signing.Command(
            id=request.id,
            agent_id=request.agent_id,
            action=request.action,
            args=agent_args(request.action, request.args),
            issued_ns=now_ns(),
            expires_ns=request.expires_ns,
        )
        if request.agent_id == "*":
            topic = topics.broadcast_topic(self.prefix)
        else:
            topic = topics.agent_topic(self.prefix, request.agent_id, topics.COMMANDS)
        try:
            await client.publish(topic, signing.sign(self.key, command), qos=1)
        except aiomqtt.MqttError as exc:
            await self._state(
                request.id, request.agent_id, request.action, "failed", error=str(exc)
            )
            return
        await self._state(request.id, request.agent_id, request.action, "sent")

    async def ack(self, agent_id: str, payload: bytes) -> None:
        """An agent's acknowledgement from ``agents/<id>/acks``.

        Raises:
            EventError: the acknowledgement is malformed, speaks for another
                agent, or names a command that agent was not sent.
        """
        try:
            ack = msgspec.json.decode(payload, type=signing.Ack)
        except msgspec.DecodeError as exc:
            raise EventError(f"invalid acknowledgement: {exc}") from None
        if ack.agent_id != agent_id:
            msg = (
                f"acknowledgement claims agent {ack.agent_id!r} on {agent_id!r}'s topic"
            )
            raise EventError(msg)
        row = await asyncio.to_thread(self.hive.store.command, ack.id)
        if row is None or row["agent_id"] not in (agent_id, "*"):
            raise EventError(f"acknowledgement of command {ack.id!r} not sent to it")
        self.hive.metrics.inc(f"commands.{ack.state}")
        if row["agent_id"] == "*":
            results = dict(row["result"] or {})
            results[agent_id] = {"state": ack.state, "result": ack.result}
            await self.hive.store.update_command(ack.id, ack.state, results, ack.error)
        elif row["state"] in ANSWERED or (
            row["state"] == "timed_out" and ack.state == "acknowledged"
        ):
            # A late final answer still replaces timed_out: it is the truth.
            logger.info(
                "Command %s answered %s after it was %s.",
                ack.id,
                ack.state,
                row["state"],
            )
            return
        else:
            await self.hive.store.update_command(
                ack.id, ack.state, ack.result, ack.error
            )
        await self._publish_state(
            ack.id, agent_id, row["action"], ack.state, ack.result, ack.error
        )

    async def watch_expiry(self) -> None:
        """Mark as timed out the commands that expired with no final answer."""
        while await self.hive.sleep(EXPIRY_CHECK_INTERVAL):
            await self.expire(now_ns())

    async def expire(self, now: int) -> int:
        """Time out what expired before ``now``; returns how many."""
        store, count = self.hive.store, 0
        for state in ("pending", "sent", "acknowledged"):
            rows = await asyncio.to_thread(store.commands, state=state, limit=None)
            for row in rows:
                if row["expires"] is not None and row["expires"] <= now:
                    if row["agent_id"] == "*" and row["result"]:
                        continue  # some agents answered: a broadcast is not late
                    await self._state(
                        row["id"], row["agent_id"], row["action"], "timed_out"
                    )
                    count += 1
        return count

    async def _state(
        self,
        command_id: str,
        agent_id: str,
        action: str,
        state: str,
        *,
        error: str | None = None,
    ) -> None:
        self.hive.metrics.inc(f"commands.{state}")
        await self.hive.store.update_command(command_id, state, error=error)
        await self._publish_state(command_id, agent_id, action, state, None, error)

    async def _publish_state(
        self,
        command_id: str,
        agent_id: str,
        action: str,
        state: str,
        result: dict[str, Any] | None,
        error: str | None,
    ) -> None:
        if state in ("failed", "refused", "timed_out"):
            logger.warning(
                "Command %s (%s) for %s %s: %s.",
                command_id,
                action,
                agent_id,
                state,
                error,
            )
        message = {
            "id": command_id,
            "agent_id": agent_id,
            "action": action,
            "state": state,
            "result": result,
            "error": error,
        }
        await self.hive.publish("command.state", message, key=agent_id)
