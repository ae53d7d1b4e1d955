"""The agent: one sensor's events, batched and published to the hive over MQTT.

The sensor runs on its own thread and hands each event to the event loop
(``call_soon_threadsafe``), where it waits in a bounded in-memory queue. One
task cuts the queue into batches of up to ``batch_max_events`` events or
``batch_max_delay`` seconds and publishes them at QoS 1; another sends a
heartbeat. When the broker is away the agent reconnects forever (jittered
exponential backoff) and the queue keeps the events, in order, for later.

Delivery is at least once: a batch whose PUBACK was lost with the connection
is sent again after reconnecting, and the hive can tell the copies by event id.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import aiomqtt
import msgspec

import immune
from immune import topics
from immune.agent import policy
from immune.agent.cnproc import CnProcSensor
from immune.agent.sensors import Sensor, open_sensors
from immune.config import Config
from immune.errors import ConfigError
from immune.events import SCHEMA_VERSION, Event, encode, new_id, now_ns
from immune.metrics import Metrics
from immune.mqtt import Backoff, BrokerAddress, client_kwargs, parse_url

logger = logging.getLogger(__name__)

QUEUE_SIZE = 100_000
#: The least time between two warnings about dropped events.
DROP_LOG_EVERY = 10.0
COUNTERS = (
    "agent.events_seen",
    "agent.events_sent",
    "agent.batches_sent",
    "agent.dropped",
    "agent.sensor_overruns",
    "agent.reconnects",
    "agent.blocked",
)

# Put in the queue after the last event: the batcher sends what is left, then
# returns instead of waiting for more.
_STOP: Any = object()


def broker_address(config: Config) -> BrokerAddress:
    """Where the agent publishes, from ``mqtt.url``.

    Raises:
        ConfigError: the URL is empty (the hive's embedded broker, which an
            agent started on its own cannot reach) or not an MQTT URL.
    """
    if not config.mqtt.url:
        msg = (
            "mqtt.url is empty (the hive's embedded broker); an agent needs the "
            "broker's URL, e.g. mqtt://127.0.0.1:1883"
        )
        raise ConfigError(msg)
    return parse_url(config.mqtt.url)


def host_facts() -> dict[str, str]:
    """What the registration says about this host (no subprocess spawned)."""
    uname = os.uname()
    facts = {"os": platform.system(), "kernel": uname.release, "arch": uname.machine}
    try:
        facts["os_name"] = platform.freedesktop_os_release()["PRETTY_NAME"]
    except (OSError, KeyError):
        pass
    return facts


class Agent:
    """Watches this host with the first working sensor and reports to the hive.

    Args:
        config: ``[agent]`` picks the sensor and sizes batches and heartbeats,
            ``[mqtt]`` says where to publish.
        metrics: where the ``agent.*`` counters go (a new set when None).
        queue_size: events held in memory while the broker is slow or away;
            beyond that new events are dropped, counted and logged.
        shutdown_timeout: seconds :meth:`run` spends, once stopped, sending
            what is left before giving up on it.
        priority_boost: the nice value of the thread running :meth:`run`
            while the CN_PROC sensor runs (needs root; restored on exit), or
            None to leave it alone.

    Raises:
        ConfigError: the agent id (the host name by default) cannot be used
            in a topic, or ``mqtt.url`` is unusable.
    """

    def __init__(
        self,
        config: Config,
        metrics: Metrics | None = None,
        *,
        queue_size: int = QUEUE_SIZE,
        shutdown_timeout: float = 5.0,
        priority_boost: int | None = -10,
    ) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics()
        self.agent_id = config.agent_id
        if not topics.is_valid_agent_id(self.agent_id):
            msg = (
                f"agent id {self.agent_id!r} cannot be used in an MQTT topic; "
                "set [agent] id to letters, digits and ._:-"
            )
            raise ConfigError(msg)
        self.host = socket.gethostname()[:256]
        self.broker = broker_address(config)
        self.queue_size = queue_size
        self.shutdown_timeout = shutdown_timeout
        self.priority_boost = priority_boost
        #: The sensor that runs, once :meth:`run` has opened one.
        self.sensor: Sensor | None = None
        #: Set while connected to the broker (after registration).
        self.connected = asyncio.Event()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._pending: list[Event] = []
        self._drained = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started_ns = 0
        self._started = 0.0
        self._last_drop_log = -DROP_LOG_EVERY
        for name in COUNTERS:
            self.metrics.inc(name, 0)

    def topic(self, leaf: str) -> str:
        return topics.agent_topic(self.config.mqtt.topic_prefix, self.agent_id, leaf)

    # --- Running ------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (or the task is cancelled).

        On a clean stop the sensor is stopped, an ``agent_stop`` event and
        what is still queued are sent (for up to ``shutdown_timeout``
        seconds), and the retained status becomes offline.

        Raises:
            SensorUnavailableError: no sensor of ``[agent] sensors`` works.
        """
        self._loop = asyncio.get_running_loop()
        self._started_ns, self._started = now_ns(), time.monotonic()
        self.sensor = self._open_sensor()
        self.put(self.lifecycle("agent_start"))
        self.sensor.start()
        restore = self._boost_loop_thread()
        try:
            async with asyncio.TaskGroup() as tg:
                link = tg.create_task(self._link(), name="immune-agent-link")
                await (stop or asyncio.Event()).wait()
                await self._shutdown(link)
        finally:
            self.sensor.stop()
            restore()

    def _boost_loop_thread(self) -> Callable[[], None]:
        """Raise this thread's priority while a racing sensor runs.

        The CN_PROC thread must read a new process before it exits, but it
        needs the GIL, and this thread holds it while handling events: if
        the host's load preempts it then, the sensor waits, and the process
        is gone (priority inversion). With two CPU hogs on two vCPUs, the
        exe of a 1 ms process was read 88% of the time with this thread at
        nice 0, 99% at nice -10. Returns what undoes it.
        """
        sensors = getattr(self.sensor, "sensors", [self.sensor])
        cn_proc = any(isinstance(sensor, CnProcSensor) for sensor in sensors)
        if self.priority_boost is None or not cn_proc:
            return lambda: None
        tid = threading.get_native_id()
        try:
            before = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, self.priority_boost)
        except OSError as exc:
            logger.debug("Event loop thread keeps its priority: %s", exc)
            return lambda: None
        return lambda: os.setpriority(os.PRIO_PROCESS, tid, before)

    def _open_sensor(self) -> Sensor:
        agent = self.config.agent
        store = policy.PolicyStore(agent.policy or None)
        policy.install(store)  # what the hive's `policy` command changes
        return open_sensors(
            agent.sensors,
            {
                "proc": {"interval": agent.proc_poll_interval},
                "fanotify": {"scope": agent.fanotify_scope},
                "kmod": {"policy": agent.kmod_policy or None},
            },
            policy=store,
            agent_id=self.agent_id,
            host=self.host,
            emit=self.emit,
            metrics=self.metrics,
            on_error=self._sensor_failed,
        )

    async def _shutdown(self, link: asyncio.Task[None]) -> None:
        assert self.sensor is not None
        await asyncio.to_thread(self.sensor.stop)
        self.put(self.lifecycle("agent_stop"))
        self._queue.put_nowait(_STOP)
        done, _ = await asyncio.wait({link}, timeout=self.shutdown_timeout)
        if not done:
            left = self._queue.qsize() - 1 + len(self._pending)
            logger.warning(
                "Stopping with %d events unsent: the broker at %s was not "
                "reachable within %.1f s.",
                max(left, 0),
                self.broker,
                self.shutdown_timeout,
            )
            link.cancel()

    # --- From the sensor thread to the queue --------------------------------

    def emit(self, event: Event) -> None:
        """Hand an event over from any thread (the sensor's callback)."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self.put, event)
        except RuntimeError:
            # The loop closed under a sensor that outlived run(): say so.
            self.metrics.inc("agent.dropped")
            logger.warning("Event %s dropped: the agent has stopped.", event.kind)

    def put(self, event: Event) -> None:
        """Queue an event (on the loop's thread); drop it, loudly, when full."""
        self.metrics.inc("agent.events_seen")
        if self._queue.qsize() < self.queue_size:
            self._queue.put_nowait(event)
            return
        self.metrics.inc("agent.dropped")
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_EVERY:
            self._last_drop_log = now
            logger.warning(
                "Event queue full (%d events, broker slow or away): dropping new "
                "events, %d so far.",
                self.queue_size,
                self.metrics.get("agent.dropped"),
            )

    def lifecycle(self, kind: str, **extra: Any) -> Event:
        """An event about the agent itself (agent_start, agent_stop, ...)."""
        return Event(
            id=new_id(),
            agent_id=self.agent_id,
            host=self.host,
            ts=now_ns(),
            kind=kind,  # type: ignore[arg-type]  # one of AGENT_KINDS
            pid=os.getpid(),
            sensor="agent",
            extra={
                "version": immune.__version__,
                "sensor": self.sensor.name if self.sensor else None,
                **extra,
            },
        )

    def _sensor_failed(self, exc: BaseException) -> None:
        # Called on the dying sensor thread.
        event = self.lifecycle("sensor_error", error=f"{type(exc).__name__}: {exc}")
        self.emit(event)

    # --- The link to the broker ---------------------------------------------

    def _client(self) -> aiomqtt.Client:
        # Not mqtt.client_id: `immune up` shares its configuration with the
        # hive, and two clients with one id would take turns kicking each other.
        offline = {"status": "offline", "agent_id": self.agent_id, "reason": "lost"}
        will = aiomqtt.Will(
            self.topic(topics.STATUS), encode(offline), qos=1, retain=True
        )
        return aiomqtt.Client(
            identifier=f"immune-agent-{self.agent_id}",
            will=will,
            **client_kwargs(self.config.mqtt, self.broker),  # type: ignore[arg-type]
        )

    async def _link(self) -> None:
        """Connect, and reconnect forever, until the queue is drained."""
        backoff = Backoff()
        task = asyncio.current_task()
        while not self._drained:
            error: BaseException | None = None
            try:
                async with self._client() as client:
                    backoff.reset()
                    await self._session(client)
            except* aiomqtt.MqttError as group:
                error = group.exceptions[0]
            self.connected.clear()
            # On 3.11 a TaskGroup whose child fails while the group is being
            # cancelled raises the child's error and drops the cancellation.
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            if error is None:
                continue
            delay = backoff.next()
            self.metrics.inc("agent.reconnects")
            logger.warning(
                "MQTT broker %s unavailable (%s); reconnecting in %.1f s "
                "(attempt %d, %d events queued).",
                self.broker,
                error,
                delay,
                backoff.attempt,
                self._queue.qsize() + len(self._pending),
            )
            await asyncio.sleep(delay)

    async def _session(self, client: aiomqtt.Client) -> None:
        await self._announce(client)
        self.connected.set()
        logger.info("Agent %s connected to %s.", self.agent_id, self.broker)
        async with asyncio.TaskGroup() as tg:
            watch = tg.create_task(self._watch(client), name="immune-agent-watch")
            beat = tg.create_task(self._heartbeats(client), name="immune-agent-beat")
            await tg.create_task(self._batches(client), name="immune-agent-batches")
            watch.cancel()
            beat.cancel()
        await self._publish_status(client, "offline", reason="stopped")
        self._drained = True

    async def _watch(self, client: aiomqtt.Client) -> None:
        # Raises MqttError as soon as the connection drops, rather than when
        # a publish times out; later, hive commands arrive here.
        async for message in client.messages:
            logger.debug("Ignoring a message on %s.", message.topic)

    async def _announce(self, client: aiomqtt.Client) -> None:
        assert self.sensor is not None
        registration = {
            "v": SCHEMA_VERSION,
            "agent_id": self.agent_id,
            "hostname": self.host,
            **host_facts(),
            "version": immune.__version__,
            "sensors": self.sensor.names,
            "started": self._started_ns,
            "pid": os.getpid(),
        }
        await client.publish(self.topic(topics.REGISTER), encode(registration), qos=1)
        await self._publish_status(client, "online")

    async def _publish_status(
        self, client: aiomqtt.Client, status: str, **more: Any
    ) -> None:
        payload = {"status": status, "agent_id": self.agent_id, "ts": now_ns()}
        payload.update(more)
        await client.publish(
            self.topic(topics.STATUS), encode(payload), qos=1, retain=True
        )

    async def _heartbeats(self, client: aiomqtt.Client) -> None:
        interval = self.config.agent.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            await client.publish(
                self.topic(topics.HEARTBEAT), encode(self.heartbeat()), qos=1
            )

    def heartbeat(self) -> dict[str, Any]:
        """The heartbeat's payload: liveness, counters and queue depth."""
        depth = self._queue.qsize() + len(self._pending)
        self.metrics.set("agent.queue_depth", depth)
        counters = self.metrics.snapshot()
        return {
            "agent_id": self.agent_id,
            "ts": now_ns(),
            "uptime": round(time.monotonic() - self._started, 3),
            "sensor": self.sensor.name if self.sensor else None,
            "counters": {
                name: value
                for name, value in counters.items()
                if name in COUNTERS or name.startswith("agent.sensor.")
            },
            "queue": depth,
        }

    # --- Batches -------------------------------------------------------------

    async def _batches(self, client: aiomqtt.Client) -> None:
        """Publish batches until the stop marker has gone through the queue.

        ``_pending`` outlives a lost connection, so the batch that was being
        filled or sent goes first after reconnecting and nothing is lost or
        reordered.
        """
        # TODO(#3): spool to disk, so that queued events survive a restart.
        topic = self.topic(topics.EVENTS)
        stopped = False
        while not stopped or self._pending:
            if not self._pending:
                stopped = await self._fill()
                if not self._pending:
                    continue
            batch = self._pending
            await self._publish_batch(client, topic, batch)
            self._pending = []
            self.metrics.inc("agent.events_sent", len(batch))

    async def _publish_batch(
        self, client: aiomqtt.Client, topic: str, batch: list[Event]
    ) -> None:
        # Keep each message under batch_max_bytes, well below what a hive
        # accepts: halve a batch that is too big; shorten a lone event's argv.
        payload = encode(
            {"v": SCHEMA_VERSION, "agent_id": self.agent_id, "events": batch}
        )
        limit = self.config.agent.batch_max_bytes
        if len(payload) > limit and len(batch) > 1:
            half = len(batch) // 2
            await self._publish_batch(client, topic, batch[:half])
            await self._publish_batch(client, topic, batch[half:])
            return
        if len(payload) > limit:
            batch = [shorten(batch[0], limit)]
            self.metrics.inc("agent.events_shortened")
            payload = encode(
                {"v": SCHEMA_VERSION, "agent_id": self.agent_id, "events": batch}
            )
        await client.publish(topic, payload, qos=1)
        self.metrics.inc("agent.batches_sent")

    async def _fill(self) -> bool:
        """Move events into ``_pending`` for one batch; True at the stop marker."""
        limit = self.config.agent.batch_max_events
        item = await self._queue.get()
        deadline = asyncio.get_running_loop().time() + self.config.agent.batch_max_delay
        while item is not _STOP:
            self._pending.append(item)
            if len(self._pending) >= limit:
                return False
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    async with asyncio.timeout_at(deadline):
                        item = await self._queue.get()
                except TimeoutError:
                    return False
        self._queue.put_nowait(_STOP)  # seen again after a reconnect
        return True


def shorten(event: Event, limit: int) -> Event:
    """The event with its argv cut so that it encodes in about ``limit`` bytes.

    The cut is marked in ``extra["truncated"]`` with the original argument
    count, so an analyst knows the command line is incomplete.
    """
    argv = list(event.argv or [])
    budget = max(limit // 2, 1024)
    kept: list[str] = []
    for arg in argv:
        if budget <= 0:
            break
        piece = arg[:budget]
        kept.append(piece)
        budget -= len(piece.encode()) * 2 + 8  # JSON escaping may double it
    extra = dict(event.extra or {})
    extra["truncated"] = f"argv: {len(argv)} arguments, {len(kept)} kept"
    return msgspec.structs.replace(event, argv=kept, extra=extra)
