"""The agent: URL parsing, the queue, and end to end against a real Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import orjson
import pytest

from immune import __version__
from immune.agent import Agent
from immune.config import AgentConfig, Config, MqttConfig
from immune.errors import ConfigError
from immune.events import Event, decode_batch, new_id, now_ns
from immune.metrics import Metrics

# --- Pieces ----------------------------------------------------------------------


def test_empty_url_is_refused_with_a_hint() -> None:
    config = Config(agent=AgentConfig(id="u1"), mqtt=MqttConfig(url=""))
    with pytest.raises(ConfigError, match="embedded broker"):
        Agent(config)


def test_agent_id_must_fit_a_topic() -> None:
    with pytest.raises(ConfigError, match="set \\[agent\\] id"):
        Agent(Config(agent=AgentConfig(id="has space")))


async def test_full_queue_drops_counts_and_logs(caplog) -> None:
    agent = Agent(Config(agent=AgentConfig(id="q1")), queue_size=2)
    for _ in range(5):
        agent.put(agent.lifecycle("agent_start"))
    assert agent.metrics.get("agent.dropped") == 3
    assert agent.metrics.get("agent.events_seen") == 5
    assert caplog.text.count("Event queue full") == 1  # once per 10 s


# --- Against a real broker ---------------------------------------------------


def config_for(url: str, prefix: str, **agent: Any) -> Config:
    options: dict[str, Any] = {
        "id": f"agent-{uuid.uuid4().hex[:8]}",
        "heartbeat_interval": 0.2,
        "batch_max_delay": 0.05,
        **agent,
    }
    return Config(
        mqtt=MqttConfig(url=url, topic_prefix=prefix, keepalive=5),
        agent=AgentConfig(**options),
    )


class Inbox:
    """Every message under a prefix, decoded, as (leaf, retained, payload)."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.messages: list[tuple[str, bool, Any]] = []
        self._arrived = asyncio.Event()

    async def pump(self) -> None:
        async for message in self.client.messages:
            leaf = str(message.topic).rsplit("/", 1)[1]
            payload = orjson.loads(message.payload)  # type: ignore[arg-type]
            self.messages.append((leaf, message.retain, payload))
            self._arrived.set()

    def events(self) -> list[dict[str, Any]]:
        return [
            e for leaf, _, p in self.messages if leaf == "events" for e in p["events"]
        ]

    async def wait_for(self, found: Callable[[], Any], timeout: float = 10.0) -> Any:
        async with asyncio.timeout(timeout):
            while not (result := found()):
                self._arrived.clear()
                await self._arrived.wait()
        return result

    def first(self, leaf: str, **fields: Any) -> Callable[[], Any]:
        def find() -> Any:
            for got, retained, payload in self.messages:
                if got == leaf and fields.items() <= payload.items():
                    return retained, payload
            return None

        return find

    def event(self, **fields: Any) -> Callable[[], Any]:
        return lambda: next(
            (e for e in self.events() if fields.items() <= e.items()), None
        )


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or 1883


@contextlib.asynccontextmanager
async def inbox(url: str, topic: str) -> AsyncIterator[Inbox]:
    host, port = _address(url)
    async with aiomqtt.Client(host, port, identifier=f"t-{uuid.uuid4().hex}") as sub:
        await sub.subscribe(topic, qos=1)
        box = Inbox(sub)
        pump = asyncio.create_task(box.pump(), name="test-inbox")
        try:
            yield box
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump


async def retained(url: str, topic: str) -> dict[str, Any]:
    """The retained message of a topic, as a new subscriber sees it."""
    async with inbox(url, topic) as box:
        flag, payload = await box.wait_for(box.first(topic.rsplit("/", 1)[1]))
    assert flag, "a retained message"
    return payload  # type: ignore[no-any-return]


async def clear_retained(url: str, topic: str) -> None:
    """Leave the shared broker as found: an empty retained payload clears it."""
    host, port = _address(url)
    async with aiomqtt.Client(host, port) as client:
        await client.publish(topic, b"", qos=1, retain=True)


@pytest.mark.mqtt
async def test_agent_end_to_end(mqtt_broker: str, mqtt_prefix: str, tmp_path) -> None:
    config = config_for(mqtt_broker, mqtt_prefix)
    agent_id = config.agent.id
    program = tmp_path / "sleep-copy"
    shutil.copy("/bin/sleep", program)
    base = f"{mqtt_prefix}/agents/{agent_id}"

    nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    async with inbox(mqtt_broker, f"{mqtt_prefix}/#") as box:
        stop = asyncio.Event()
        agent = Agent(config)
        running = asyncio.create_task(agent.run(stop), name="test-agent")
        await asyncio.wait_for(agent.connected.wait(), 10)
        online = await retained(mqtt_broker, f"{base}/status")
        assert online["status"] == "online" and online["agent_id"] == agent_id

        # A process lasting long enough for either sensor to see it.
        child = await asyncio.create_subprocess_exec(str(program), "0.6")
        assert await child.wait() == 0
        exec_event = await box.wait_for(box.event(kind="exec", exe=str(program)))
        await box.wait_for(box.first("heartbeat"))
        stop.set()
        await asyncio.wait_for(running, 10)
        await box.wait_for(box.event(kind="agent_stop"))

    _, registration = box.first("register")()  # type: ignore[misc]
    assert registration["agent_id"] == agent_id
    assert registration["hostname"] == socket.gethostname()
    assert registration["kernel"] == os.uname().release
    assert registration["os"] == "Linux" and registration["version"] == __version__
    assert registration["sensors"] == agent.sensor.names  # type: ignore[union-attr]
    assert registration["started"] <= now_ns()

    assert exec_event["pid"] == child.pid
    assert exec_event["argv"] == [str(program), "0.6"]
    assert exec_event["agent_id"] == agent_id
    # The program lives under /tmp: the local policy's exec rule marks it.
    assert exec_event["severity"] == "high"
    assert exec_event["extra"]["rule"] == "exec_path"
    events = box.events()
    assert events[0]["kind"] == "agent_start" and events[-1]["kind"] == "agent_stop"

    # Every batch is one the hive accepts whole.
    for leaf, _, payload in box.messages:
        if leaf == "events":
            assert payload["v"] == 1 and payload["agent_id"] == agent_id
            raw = orjson.dumps(payload)
            good, bad = decode_batch(raw, max_bytes=1 << 20, agent_id=agent_id)
            assert bad == [] and len(good) == len(payload["events"])

    _, beat = box.first("heartbeat")()  # type: ignore[misc]
    assert beat["agent_id"] == agent_id and beat["uptime"] > 0 and "queue" in beat
    assert set(beat["counters"]) >= {"agent.events_seen", "agent.dropped"}

    offline = await retained(mqtt_broker, f"{base}/status")
    assert offline["status"] == "offline" and offline["reason"] == "stopped"
    # The loop thread's priority, raised for CN_PROC, is given back.
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == nice
    assert agent.metrics.get("agent.events_sent") == len(events)
    assert agent.metrics.get("agent.batches_sent") >= 2
    assert agent.metrics.get("agent.dropped") == 0
    await clear_retained(mqtt_broker, f"{base}/status")


class Relay:
    """A TCP relay to the broker that the test can take down and bring back."""

    def __init__(self, url: str) -> None:
        self.target = _address(url)
        self.port = _free_port()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    async def up(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def down(self) -> None:
        """Stop listening and cut every connection, as a crashing broker does."""
        if self.server is not None:
            self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        if self.tasks:
            await asyncio.wait(self.tasks)
        if self.server is not None:
            await self.server.wait_closed()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.writers.add(writer)
        up_writer = None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            self.writers.add(up_writer)
            await asyncio.gather(
                self._pipe(reader, up_writer), self._pipe(up_reader, writer)
            )
        finally:
            for end in (writer, up_writer):
                if end is not None:
                    self.writers.discard(end)
                    end.transport.abort()
            self.tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def marker(agent: Agent, n: int) -> Event:
    return Event(
        id=new_id(),
        agent_id=agent.agent_id,
        host=agent.host,
        ts=now_ns(),
        kind="exec",
        pid=1,
        sensor="test",
        extra={"marker": n},
    )


@pytest.mark.mqtt
async def test_agent_reconnects_and_sends_queued_events_in_order(
    mqtt_broker: str, mqtt_prefix: str, caplog
) -> None:
    caplog.set_level(logging.WARNING, logger="immune.agent.agent")
    relay = Relay(mqtt_broker)
    config = config_for(
        f"mqtt://127.0.0.1:{relay.port}",
        mqtt_prefix,
        sensors=["proc"],
        proc_poll_interval=5.0,
        heartbeat_interval=30.0,
    )
    base = f"{mqtt_prefix}/agents/{config.agent.id}"

    def markers() -> list[int]:
        # Delivery is at least once: a batch whose PUBACK the drop swallowed
        # comes again. What counts is each marker's first arrival.
        extras = [e.get("extra") or {} for e in box.events()]
        return list(dict.fromkeys(x["marker"] for x in extras if "marker" in x))

    async with inbox(mqtt_broker, f"{mqtt_prefix}/#") as box:
        stop = asyncio.Event()
        agent = Agent(config)
        running = asyncio.create_task(agent.run(stop), name="test-agent")
        try:
            # No broker yet: events wait in the queue, attempts are logged.
            async with asyncio.timeout(10):
                while agent.metrics.get("agent.reconnects") < 2:
                    await asyncio.sleep(0.05)
            for n in range(50):
                agent.put(marker(agent, n))
            await relay.up()
            await box.wait_for(lambda: len(markers()) == 50)
            assert markers() == list(range(50))
            async with asyncio.timeout(10):  # acknowledged: not sent again
                while agent.metrics.get("agent.events_sent") < 51:
                    await asyncio.sleep(0.01)

            # The connection drops: the will says so, events queue again.
            await relay.down()
            lost = await box.wait_for(box.first("status", reason="lost"))
            assert lost[1]["status"] == "offline"
            for n in range(50, 80):
                agent.put(marker(agent, n))
            await relay.up()
            await box.wait_for(lambda: len(markers()) == 80)
            assert markers() == list(range(80))
            stop.set()
            await asyncio.wait_for(running, 10)
        finally:
            stop.set()
            await relay.down()
            if not running.done():
                running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running

    assert agent.metrics.get("agent.reconnects") >= 3
    assert "reconnecting in" in caplog.text
    offline = await retained(mqtt_broker, f"{base}/status")
    assert offline["reason"] == "stopped"
    await clear_retained(mqtt_broker, f"{base}/status")


@pytest.mark.mqtt
async def test_agent_shares_metrics_as_immune_up_runs_it(
    mqtt_broker: str, mqtt_prefix: str
) -> None:
    shared = Metrics()
    shared.inc("events.received", 7)  # the hive's own counters stay as they are
    config = config_for(mqtt_broker, mqtt_prefix, sensors=["proc"])
    stop = asyncio.Event()
    agent = Agent(config, metrics=shared)
    task = asyncio.create_task(agent.run(stop), name="test-agent")
    async with inbox(mqtt_broker, f"{mqtt_prefix}/#") as box:
        await box.wait_for(box.first("status", status="online"))
        stop.set()
        await asyncio.wait_for(task, 10)
    assert shared.get("events.received") == 7
    # agent_start, agent_stop, and whatever the /proc sensor saw meanwhile:
    # other processes of this machine may come and go during the test.
    assert shared.get("agent.events_sent") == shared.get("agent.events_seen") >= 2
    assert shared.get("agent.dropped") == 0
    await clear_retained(mqtt_broker, agent.topic("status"))


async def test_sensor_failure_becomes_a_sensor_error_event() -> None:
    agent = Agent(Config(agent=AgentConfig(id="e1")))
    agent._loop = asyncio.get_running_loop()
    agent._sensor_failed(RuntimeError("boom"))  # as the dying thread would
    await asyncio.sleep(0)
    event = agent._queue.get_nowait()
    assert event.kind == "sensor_error" and event.sensor == "agent"
    assert event.extra is not None and event.extra["error"] == "RuntimeError: boom"
