"""network: the agents' transport into the hive, over MQTT.

Subscribes to every agent's ``events``, ``register``, ``heartbeat`` and
``status`` topics, validates what arrives, puts good events on the bus and
keeps bad input as dead letters with the reason. Tracks agents online and
offline, and publishes the hive's alerts for integrators.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiomqtt
import msgspec
import orjson

from immune import topics
from immune.errors import EventError
from immune.events import Alert, Int64, decode_batch, encode, now_ns
from immune.hookspecs import hookimpl
from immune.mqtt import Backoff, BrokerAddress, client_kwargs, parse_url
from immune.safe import printable

if TYPE_CHECKING:
    from immune.hive import Hive

logger = logging.getLogger(__name__)

OFFLINE_CHECK_INTERVAL = 30.0
SEEN_EVERY_NS = 5 * 10**9
_LEAVES = (topics.EVENTS, topics.REGISTER, topics.HEARTBEAT, topics.STATUS)


class AgentHello(msgspec.Struct, kw_only=True):
    """What an agent says on ``register`` (and, in part, on ``heartbeat``)."""

    agent_id: str
    hostname: str = ""
    os: str = ""
    kernel: str = ""
    version: str = ""
    sensors: list[str] = msgspec.field(default_factory=list)
    started: Int64 | None = None
    status: str | None = None
    counters: dict[str, Int64 | float] = msgspec.field(default_factory=dict)


class NetworkPlugin:
    """The MQTT transport of the hive."""

    name = "network"

    def __init__(self) -> None:
        self.hive: Hive  # set by immune_configure
        self.address: BrokerAddress | None = None
        self.client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self._last_seen: dict[str, int] = {}

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

    @hookimpl
    def immune_subscriptions(self) -> list[tuple[str, Any]]:
        return [("alert.#", self.forward_alert)]

    @hookimpl
    def immune_start(self, hive: Hive) -> None:
        hive.create_task(self.run(), name="immune-network-mqtt")
        hive.create_task(self.watch_offline(), name="immune-network-offline")

    # -- the connection ----------------------------------------------------

    async def run(self) -> None:
        """Stay connected and ingest, until the hive stops."""
        assert self.address is not None
        hive, backoff = self.hive, Backoff()
        config = hive.config.mqtt
        identifier = config.client_id or f"immune-hive-{socket.gethostname()}"
        while not hive.stopping.is_set():
            try:
                async with aiomqtt.Client(
                    identifier=identifier,
                    clean_session=not config.persistent_session,
                    will=aiomqtt.Will(
                        topics.hive_status_topic(self.prefix),
                        orjson.dumps({"status": "offline"}),
                        qos=1,
                        retain=True,
                    ),
                    **client_kwargs(config, self.address),  # type: ignore[arg-type]
                ) as client:
                    await self._session(client)
                    backoff.reset()
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                self.client = None
                hive.metrics.inc("mqtt.disconnects")
                delay = backoff.next()
                logger.warning(
                    "MQTT broker %s unreachable (%s); retrying in %.1f s.",
                    self.address,
                    exc,
                    delay,
                )
                try:
                    await asyncio.wait_for(hive.stopping.wait(), delay)
                except TimeoutError:
                    pass

    async def _session(self, client: aiomqtt.Client) -> None:
        hive = self.hive
        for leaf in _LEAVES:
            await client.subscribe(topics.agent_filter(self.prefix, leaf), qos=1)
        await client.publish(
            topics.hive_status_topic(self.prefix),
            orjson.dumps({"status": "online", "since": hive.started_ns}),
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
                await client.unsubscribe(topics.agent_filter(self.prefix, leaf))
            while len(client.messages):
                await self.handle(await anext(messages))
            await client.publish(
                topics.hive_status_topic(self.prefix),
                orjson.dumps({"status": "offline"}),
                qos=1,
                retain=True,
            )
        finally:
            stop.cancel()
            self.client = None
            self.connected.clear()

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
        try:
            if leaf == topics.EVENTS:
                await self._events(topic, agent_id, bytes(payload))
            elif leaf in (topics.REGISTER, topics.HEARTBEAT, topics.STATUS):
                await self._agent_message(topic, agent_id, leaf, bytes(payload))
        except EventError as exc:
            counter = "events.rejected" if leaf == topics.EVENTS else "agents.rejected"
            hive.metrics.inc(counter)
            await hive.dead_letter(topic, exc.reason, bytes(payload))
        except Exception as exc:  # noqa: BLE001 - one message must not stop ingestion
            # A message the checks above did not foresee: keep it and go on
            # with the next one rather than lose the connection's task.
            hive.metrics.inc("mqtt.handler_errors")
            logger.exception("Failed on a message from %s.", printable(topic))
            reason = f"internal error on this message: {type(exc).__name__}: {exc}"
            await hive.dead_letter(topic, reason, bytes(payload))

    async def _events(self, topic: str, agent_id: str, payload: bytes) -> None:
        hive = self.hive
        limit = hive.config.hive.max_payload_bytes
        good, bad = decode_batch(payload, max_bytes=limit, agent_id=agent_id)
        hive.metrics.inc("events.received", len(good) + len(bad))
        for rejected in bad:
            hive.metrics.inc("events.rejected")
            await hive.dead_letter(topic, rejected.reason, rejected.raw)
        if good:
            await hive.ingest(good)
            await self._seen(agent_id, good[0].host)

    async def _agent_message(
        self, topic: str, agent_id: str, leaf: str, payload: bytes
    ) -> None:
        limit = 64 * 1024
        if len(payload) > limit:
            raise EventError(f"{leaf} payload of {len(payload)} bytes exceeds {limit}")
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

    # -- agents going silent -----------------------------------------------

    async def watch_offline(self) -> None:
        hive = self.hive
        while not hive.stopping.is_set():
            try:
                await asyncio.wait_for(hive.stopping.wait(), OFFLINE_CHECK_INTERVAL)
            except TimeoutError:
                pass
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


def aiomqtt_messages(client: aiomqtt.Client) -> AsyncIterator[aiomqtt.Message]:
    return aiter(client.messages)
