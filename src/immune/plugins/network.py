"""network: the agents' transport into the hive, over MQTT.

Subscribes to every agent's ``events``, ``register``, ``heartbeat``,
``status`` and ``acks`` topics (through an MQTT 5 shared subscription when
``[mqtt] shared_group`` is set), validates what arrives, limits each agent's
message rate, puts good events on the bus and keeps bad input as dead
letters with the reason. Sends each agent a receipt once its batch is
stored, tracks agents online and offline, sends the bus's commands to
agents (:mod:`.network_commands`) and publishes the hive's alerts for
integrators. See docs/mqtt.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

import aiomqtt
import msgspec
import orjson

from immune import topics
from immune.errors import EventError
from immune.events import Alert, Int64, Seq, decode_payload, encode, now_ns
from immune.hookspecs import hookimpl
from immune.mqtt import (
    Backoff,
    BrokerAddress,
    client_kwargs,
    parse_url,
    session_kwargs,
)
from immune.plugins.network_commands import CommandDesk
from immune.safe import printable

if TYPE_CHECKING:
    from immune.hive import Hive

logger = logging.getLogger(__name__)

SEEN_EVERY_NS = 5 * 10**9
#: Largest register, heartbeat, status or acknowledgement message, in bytes.
MAX_AGENT_MESSAGE = 64 * 1024
#: The least time between two flood alerts about one agent, in seconds.
FLOOD_ALERT_EVERY = 60.0
#: Seconds between two rounds of receipts (each after one storage flush).
RECEIPT_INTERVAL = 0.02
_LEAVES = (
    topics.EVENTS,
    topics.REGISTER,
    topics.HEARTBEAT,
    topics.STATUS,
    topics.ACKS,
)
RECEIPT_TOPIC = "transport.receipt"


class BatchSeq(msgspec.Struct):
    """The spool range an agent's batch carries, to receipt it."""

    seq: Seq | None = None


class SpoolReport(msgspec.Struct):
    depth: int = 0
    dropped: int = 0


class AgentHello(msgspec.Struct, kw_only=True):
    """What an agent says on ``register`` (and, in part, on ``heartbeat``)."""

    agent_id: str
    hostname: str = ""
    os: str = ""
    kernel: str = ""
    version: str = ""
    sensors: list[str] = msgspec.field(default_factory=list)
    started: Int64 | None = None
    #: On ``status`` (retained, and the last will); another value is refused.
    status: Literal["online", "offline"] | None = None
    counters: dict[str, Int64 | float] = msgspec.field(default_factory=dict)
    spool: SpoolReport | None = None


class TokenBucket:
    """Messages one agent may still send now (refilled at ``rate`` a second)."""

    __slots__ = ("tokens", "stamp")

    def __init__(self, burst: float) -> None:
        self.tokens = burst
        self.stamp = time.monotonic()

    def take(self, rate: float, burst: float) -> bool:
        now = time.monotonic()
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class NetworkPlugin:
    """The MQTT transport of the hive."""

    name = "network"

    def __init__(self) -> None:
        self.hive: Hive  # set by immune_configure
        self.address: BrokerAddress | None = None
        self.client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self._last_seen: dict[str, int] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._flood_alerted: dict[str, float] = {}
        self._spool_dropped: dict[str, int] = {}
        self._receipts: list[tuple[str, tuple[int, int]]] = []
        self.desk: CommandDesk

    @hookimpl
    def immune_describe(self) -> dict[str, str]:
        return {
            "description": "MQTT ingestion of agent events, registrations, heartbeats"
        }

    @hookimpl
    def immune_configure(self, hive: Hive) -> None:
        self.hive = hive
        self.address = parse_url(hive.config.mqtt.url)
        self.prefix = hive.config.mqtt.topic_prefix
        self.group = hive.config.mqtt.shared_group
        self.desk = CommandDesk(hive, lambda: self.client)

    @hookimpl
    def immune_subscriptions(self) -> list[tuple[str, Any]]:
        return [
            ("alert.#", self.forward_alert),
            ("command.send", self.desk.send),
            (RECEIPT_TOPIC, self._stored),
        ]

    @hookimpl
    def immune_start(self, hive: Hive) -> None:
        self.desk.check_key()  # a bad key file fails the start, not a command
        hive.create_task(self.run(), name="immune-network-mqtt")
        hive.create_task(self.watch_offline(), name="immune-network-offline")
        hive.create_task(self.desk.watch_expiry(), name="immune-network-commands")
        hive.create_task(self.send_receipts(), name="immune-network-receipts")

    # -- the connection ----------------------------------------------------

    async def run(self) -> None:
        """Stay connected and ingest, until the hive stops."""
        assert self.address is not None
        hive, backoff = self.hive, Backoff()
        config = hive.config.mqtt
        identifier = config.client_id or topics.default_client_id(
            "hive", socket.gethostname(), config.topic_prefix
        )
        if self.group and not config.client_id:
            identifier += f"-{os.getpid()}"  # several hives on one host
        while not hive.stopping.is_set():
            try:
                async with aiomqtt.Client(
                    identifier=identifier,
                    will=aiomqtt.Will(
                        topics.hive_status_topic(self.prefix),
                        orjson.dumps({"v": 1, "status": "offline"}),
                        qos=1,
                        retain=True,
                    ),
                    **session_kwargs(config, persistent=config.persistent_session),
                    **client_kwargs(config, self.address),
                ) as client:
                    backoff.reset()
                    await self._session(client)
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                self.client = None
                hive.metrics.inc("mqtt.disconnects")
                level = backoff.level()
                delay = backoff.next()
                logger.log(
                    level,
                    "MQTT broker %s unreachable (%s); retrying in %.1f s (attempt %d).",
                    self.address,
                    exc,
                    delay,
                    backoff.attempt,
                )
                await hive.sleep(delay)

    async def _session(self, client: aiomqtt.Client) -> None:
        hive = self.hive
        for leaf in _LEAVES:
            await client.subscribe(self._filter(leaf), qos=1)
        await client.publish(
            topics.hive_status_topic(self.prefix),
            orjson.dumps({"v": 1, "status": "online", "since": hive.started_ns}),
            qos=1,
            retain=True,
        )
        self.client = client
        self.connected.set()
        logger.info(
            "Connected to MQTT broker %s; listening under %s/.",
            self.address,
            self.prefix,
        )

        stop = asyncio.create_task(hive.stopping.wait())
        messages = aiomqtt_messages(client)
        try:
            while True:
                nxt = asyncio.ensure_future(anext(messages))
                done, _ = await asyncio.wait({nxt, stop}, return_when="FIRST_COMPLETED")
                if nxt in done:
                    await self.handle(nxt.result())
                    continue
                nxt.cancel()
                break
            # Stopping: take no more, but handle what was already received.
            for leaf in _LEAVES:
                await client.unsubscribe(self._filter(leaf))
            while len(client.messages):
                await self.handle(await anext(messages))
            await self.hive.bus.join()  # the receipts of what was handled
            await self._flush_receipts(client)
            await client.publish(
                topics.hive_status_topic(self.prefix),
                orjson.dumps({"v": 1, "status": "offline"}),
                qos=1,
                retain=True,
            )
        finally:
            stop.cancel()
            self.client = None
            self.connected.clear()

    def _filter(self, leaf: str) -> str:
        return topics.shared(self.group, topics.agent_filter(self.prefix, leaf))

    # -- what arrives ------------------------------------------------------

    async def handle(self, message: aiomqtt.Message) -> None:
        """Validate one MQTT message and route it by its topic."""
        hive = self.hive
        topic = str(message.topic)
        payload = message.payload
        if not isinstance(payload, bytes | bytearray):
            payload = str(payload).encode()
        hive.metrics.inc("mqtt.messages")
        hive.metrics.inc("mqtt.bytes", len(payload))

        parsed = topics.parse_agent_topic(self.prefix, topic)
        if parsed is None:
            await hive.dead_letter(topic, "topic is not a valid agent topic", payload)
            return
        agent_id, leaf = parsed
        if not await self._within_rate(agent_id):
            return
        try:
            if leaf == topics.EVENTS:
                await self._events(topic, agent_id, bytes(payload))
            elif leaf == topics.ACKS:
                # A result (a process's evidence) may be large, like events.
                _check_size(leaf, payload, hive.config.hive.max_payload_bytes)
                await self.desk.ack(agent_id, bytes(payload))
            elif leaf in (topics.REGISTER, topics.HEARTBEAT, topics.STATUS):
                _check_size(leaf, payload, MAX_AGENT_MESSAGE)
                await self._agent_message(topic, agent_id, leaf, bytes(payload))
        except EventError as exc:
            counter = "events.rejected" if leaf == topics.EVENTS else "agents.rejected"
            hive.metrics.inc(counter)
            await hive.dead_letter(topic, exc.reason, bytes(payload))
            if leaf == topics.EVENTS:
                # Kept as a dead letter: receipt it, or the agent would send
                # it again forever, and nothing behind it would go.
                await self._receipt_later(agent_id, bytes(payload))
        except Exception as exc:  # noqa: BLE001 - one message must not stop ingestion
            # A message the checks above did not foresee: keep it and go on
            # with the next one rather than lose the connection's task.
            hive.metrics.inc("mqtt.handler_errors")
            logger.exception("Failed on a message from %s.", printable(topic))
            reason = f"internal error on this message: {type(exc).__name__}: {exc}"
            await hive.dead_letter(topic, reason, bytes(payload))
            if leaf == topics.EVENTS:
                await self._receipt_later(agent_id, bytes(payload))

    async def _events(self, topic: str, agent_id: str, payload: bytes) -> None:
        hive = self.hive
        limit = hive.config.hive.max_payload_bytes
        decoded = decode_payload(payload, max_bytes=limit, agent_id=agent_id)
        good, bad = decoded.events, decoded.rejected
        hive.metrics.inc("events.received", len(good) + len(bad))
        for rejected in bad:
            hive.metrics.inc("events.rejected")
            await hive.dead_letter(topic, rejected.reason, rejected.raw)
        if good:
            await hive.ingest(good)
            await self._seen(agent_id, good[0].host)
        await self._receipt(agent_id, decoded.seq)

    async def _receipt_later(self, agent_id: str, payload: bytes) -> None:
        # For a payload refused whole: its spool range, if it can be read.
        try:
            seq = _seq_decoder.decode(payload).seq
        except (msgspec.DecodeError, RecursionError):
            return
        await self._receipt(agent_id, seq)

    async def _receipt(self, agent_id: str, seq: Seq | None) -> None:
        if seq is not None:
            # After the events on the agent's bus shard: handled once storage
            # has them (see send_receipts).
            await self.hive.publish(RECEIPT_TOPIC, (agent_id, seq), key=agent_id)

    async def _within_rate(self, agent_id: str) -> bool:
        """Count a message against the agent's rate; False when over it."""
        config = self.hive.config.hive
        bucket = self._buckets.get(agent_id)
        if bucket is None:
            bucket = self._buckets[agent_id] = TokenBucket(config.agent_rate_burst)
        if bucket.take(config.agent_rate_limit, config.agent_rate_burst):
            return True
        self.hive.metrics.inc("mqtt.rate_limited")
        now = time.monotonic()
        if (
            now - self._flood_alerted.get(agent_id, -FLOOD_ALERT_EVERY)
            >= FLOOD_ALERT_EVERY
        ):
            self._flood_alerted[agent_id] = now
            logger.warning(
                "Agent %s exceeds %.0f messages/s; dropping its excess messages.",
                agent_id,
                config.agent_rate_limit,
            )
            await self.hive.raise_alert(
                rule="mqtt-agent-flood",
                title=f"Agent {agent_id} floods the hive with MQTT messages",
                severity="medium",
                plugin=self.name,
                description=(
                    "An agent sent more messages than [hive] agent_rate_limit "
                    "allows; the excess is dropped (IMMUNE agents send it again "
                    "from their spool). A compromised agent, or a runaway "
                    "producer, floods like this."
                ),
                data={"agent_id": agent_id, "limit": config.agent_rate_limit},
            )
        return False

    # -- receipts ----------------------------------------------------------

    async def _stored(self, message: tuple[str, tuple[int, int]]) -> None:
        # The bus delivers this after the batch's events, on the same shard:
        # storage has queued them; send_receipts flushes before receipting.
        self._receipts.append(message)

    async def send_receipts(self) -> None:
        """Every few ms: flush storage, then tell agents what is stored."""
        hive = self.hive
        while not hive.stopping.is_set():
            await asyncio.sleep(RECEIPT_INTERVAL)
            client = self.client
            if client is not None and self._receipts:
                try:
                    await self._flush_receipts(client)
                except aiomqtt.MqttError as exc:
                    # Agents send unreceipted batches again: nothing is lost.
                    logger.info("Receipts not sent: %s.", exc)
                except Exception as exc:  # noqa: BLE001 - receipts must go on for the others
                    hive.metrics.inc("mqtt.receipt_errors")
                    logger.error("Receipts not sent: %s.", printable(exc), exc_info=exc)

    async def _flush_receipts(self, client: aiomqtt.Client) -> None:
        receipts, self._receipts = self._receipts, []
        if not receipts:
            return
        await self.hive.store.flush()
        # All at once: each publish waits for its PUBACK.
        await asyncio.gather(
            *(
                client.publish(
                    topics.agent_topic(self.prefix, agent_id, topics.RECEIPTS),
                    orjson.dumps({"v": 1, "agent_id": agent_id, "seq": list(seq)}),
                    qos=1,
                )
                for agent_id, seq in receipts
            )
        )
        self.hive.metrics.inc("mqtt.receipts", len(receipts))

    async def _agent_message(
        self, topic: str, agent_id: str, leaf: str, payload: bytes
    ) -> None:
        if leaf == topics.STATUS and not payload:
            return  # a cleared retained message
        try:
            hello = msgspec.json.decode(payload, type=AgentHello)
        except msgspec.DecodeError as exc:
            raise EventError(f"invalid {leaf} message: {exc}") from None
        except RecursionError:
            raise EventError(f"{leaf} message is nested too deeply to decode") from None
        if hello.agent_id != agent_id:
            msg = f"{leaf} claims agent {hello.agent_id!r} on the topic of {agent_id!r}"
            raise EventError(msg)

        store = self.hive.store
        if leaf == topics.STATUS and hello.status == "offline":
            await store.set_agent_status(agent_id, "offline")
            self.hive.agent_status[agent_id] = "offline"
            await self.hive.publish("agent.offline", hello, key=agent_id)
            return
        fields: dict[str, Any] = {"status": "online"}
        if leaf == topics.REGISTER:
            fields.update(
                hostname=hello.hostname,
                os=hello.os,
                version=hello.version,
                sensors=hello.sensors,
                data={"kernel": hello.kernel, "started": hello.started},
            )
        elif leaf == topics.HEARTBEAT:
            fields["data"] = {"counters": hello.counters}
            if hello.spool is not None:
                fields["data"]["spool"] = msgspec.to_builtins(hello.spool)
                await self._spool_losses(agent_id, hello.spool.dropped)
        await store.upsert_agent(agent_id, **fields)
        self.hive.agent_status[agent_id] = "online"
        await self.hive.publish(f"agent.{leaf}", hello, key=agent_id)

    async def _seen(self, agent_id: str, host: str) -> None:
        # Any event proves the agent alive; record it at most every few
        # seconds rather than once per batch.
        now = now_ns()
        if now - self._last_seen.get(agent_id, 0) < SEEN_EVERY_NS:
            return
        self._last_seen[agent_id] = now
        self.hive.agent_status[agent_id] = "online"
        await self.hive.store.upsert_agent(agent_id, hostname=host, status="online")

    async def _spool_losses(self, agent_id: str, dropped: int) -> None:
        # The agent's spool overflowed: events are gone; say so once per rise.
        before = self._spool_dropped.get(agent_id, 0)
        self._spool_dropped[agent_id] = dropped
        if dropped <= before:
            return
        self.hive.metrics.inc("agents.spool_dropped", dropped - before)
        await self.hive.raise_alert(
            rule="agent-spool-overflow",
            title=f"Agent {agent_id} dropped {dropped - before} events: spool full",
            severity="medium",
            plugin=self.name,
            description=(
                "The agent could not deliver events for so long that its spool "
                "([agent] spool_max_events) filled up and its oldest events "
                "were dropped."
            ),
            data={"agent_id": agent_id, "dropped": dropped - before, "total": dropped},
        )

    # -- agents going silent -----------------------------------------------

    async def watch_offline(self) -> None:
        hive = self.hive
        interval = hive.config.hive.offline_check_interval
        while await hive.sleep(interval):
            deadline = now_ns() - int(hive.config.hive.agent_timeout * 1e9)
            for agent in await asyncio.to_thread(hive.store.agents):
                if agent["status"] == "online" and (agent["last_seen"] or 0) < deadline:
                    logger.warning(
                        "Agent %s silent since %s; marked offline.",
                        agent["id"],
                        agent["last_seen"],
                    )
                    await hive.store.set_agent_status(agent["id"], "offline")
                    hive.agent_status[agent["id"]] = "offline"
                    hello = AgentHello(agent_id=agent["id"], status="offline")
                    await hive.publish("agent.offline", hello, key=agent["id"])

    # -- what goes out -----------------------------------------------------

    async def forward_alert(self, alert: Alert) -> None:
        """Publish an alert for integrators (QoS 1, not retained)."""
        client = self.client
        if client is None:
            self.hive.metrics.inc("mqtt.alerts_not_forwarded")
            return
        topic = topics.alerts_topic(self.prefix, alert.severity)
        await client.publish(topic, encode(alert), qos=1)


def _check_size(leaf: str, payload: bytes | bytearray, limit: int) -> None:
    """Raises EventError when ``payload`` is over ``limit`` bytes."""
    if len(payload) > limit:
        raise EventError(f"{leaf} payload of {len(payload)} bytes exceeds {limit}")


def aiomqtt_messages(client: aiomqtt.Client) -> AsyncIterator[aiomqtt.Message]:
    return aiter(client.messages)


_seq_decoder = msgspec.json.Decoder(BatchSeq)
