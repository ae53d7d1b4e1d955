"""The agent: one sensor's events, spooled and published to the hive over MQTT.

The sensor runs on its own thread and hands each event to the event loop
(``call_soon_threadsafe``), where it waits in a bounded in-memory queue. One
task moves the queue, in chunks of up to ``batch_max_events`` events or
``batch_max_delay`` seconds, into the on-disk spool (:mod:`.spool`); while
connected, another publishes the spool's events in order, in batches at QoS
1, and deletes them when the hive's receipt says they are stored. A third
sends heartbeats, and a fourth reads receipts and commands
(:mod:`.commands`). When the broker is away the agent reconnects forever
(jittered exponential backoff) and the spool keeps the events, in order,
for later, even across a restart.

Delivery is at least once: a batch not receipted within ``receipt_timeout``,
or when the hive comes back online, is sent again, and the hive tells the
copies apart by event id.
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
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec

import immune
from immune import topics
from immune.agent import actions, policy
from immune.agent.cnproc import CnProcSensor
from immune.agent.commands import CommandRunner
from immune.agent.sensors import Sensor, open_sensors
from immune.agent.spool import Spool, default_path
from immune.config import Config, state_dir
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
    "agent.spool_dropped",
    "agent.resent",
    "agent.commands",
    "agent.commands_refused",
)
#: What a batch's envelope adds to its events, at most (generously).
ENVELOPE_BYTES = 256

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
        #: What the response actions act with (see :meth:`_action_settings`).
        self.action_settings = self._action_settings()
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
        #: Events kept until receipted (opened by :meth:`run`).
        self.spool: Spool | None = None
        self._spooled = asyncio.Event()  # set when the spool or receipts move
        self._spooler_done = False
        self._inflight: dict[int, tuple[int, float]] = {}  # last -> first, sent at
        self._hive_since: int | None = None
        self._rewind_requested = False
        self.commands = CommandRunner(config, self.agent_id, self.metrics)
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
        self.spool = self._open_spool()
        self.commands.attach(self.spool)
        self.sensor = self._open_sensor()
        self.put(self.lifecycle("agent_start"))
        self.sensor.start()
        restore = self._boost_loop_thread()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._spooler(), name="immune-agent-spooler")
                link = tg.create_task(self._link(), name="immune-agent-link")
                await (stop or asyncio.Event()).wait()
                await self._shutdown(link)
        finally:
            self.sensor.stop()
            restore()
            self.spool.close()

    def _open_spool(self) -> Spool:
        agent = self.config.agent
        path = agent.spool or default_path(self.agent_id)
        spool = Spool(path, agent.spool_max_events)
        if len(spool):
            logger.info(
                "Spool %s holds %d events from before; they go first.", path, len(spool)
            )
        self.metrics.set("agent.spool_depth", len(spool))
        return spool

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

    def _action_settings(self) -> actions.Settings:
        """Where the actions keep state and act, from ``[agent]``.

        Raises:
            ConfigError: ``cgroup_prefix`` or ``actions_netns`` is not a
                plain name.
        """
        agent = self.config.agent
        directory = agent.actions_dir or state_dir() / f"actions-{self.agent_id}"
        try:
            return actions.Settings(
                state_dir=Path(directory),
                cgroup_prefix=agent.cgroup_prefix,
                netns=agent.actions_netns or None,
                broker=(self.broker.host, self.broker.port),
            )
        except actions.ActionError as exc:
            raise ConfigError(f"[agent] {exc}") from None

    def _configure_actions(self) -> None:
        # The hive's commands act through this responder: its state (vault,
        # frozen and jailed processes) in [agent] actions_dir, the broker
        # always reachable when the host is isolated, and `policy` applying
        # a new local policy.
        actions.configure(actions.Responder(self.action_settings, self.metrics))
        actions.set_policy_handler(policy.apply_policy)

    def _open_sensor(self) -> Sensor:
        agent = self.config.agent
        store = policy.PolicyStore(agent.policy or None)
        policy.install(store)  # what the hive's `policy` command changes
        self._configure_actions()
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
            logger.warning(
                "Stopping with %d events not receipted by the hive (broker %s); "
                "they stay in the spool for the next start.",
                len(self.spool) if self.spool else 0,
                self.broker,
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
            identifier=topics.default_client_id(
                "agent", self.agent_id, self.config.mqtt.topic_prefix
            ),
            will=will,
            **client_kwargs(self.config.mqtt, self.broker),
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
            level = backoff.level()
            delay = backoff.next()
            self.metrics.inc("agent.reconnects")
            logger.log(
                level,
                "MQTT broker %s unavailable (%s); reconnecting in %.1f s "
                "(attempt %d, %d events spooled).",
                self.broker,
                error,
                delay,
                backoff.attempt,
                self.depth(),
            )
            await asyncio.sleep(delay)

    async def _session(self, client: aiomqtt.Client) -> None:
        prefix = self.config.mqtt.topic_prefix
        for topic in (
            self.topic(topics.RECEIPTS),
            self.topic(topics.COMMANDS),
            topics.broadcast_topic(prefix),
            topics.hive_status_topic(prefix),
        ):
            await client.subscribe(topic, qos=1)
        await self._announce(client)
        self._inflight.clear()  # what was sent before goes again
        self.connected.set()
        logger.info("Agent %s connected to %s.", self.agent_id, self.broker)
        async with asyncio.TaskGroup() as tg:
            watch = tg.create_task(self._watch(client), name="immune-agent-watch")
            beat = tg.create_task(self._heartbeats(client), name="immune-agent-beat")
            await tg.create_task(self._batches(client), name="immune-agent-batches")
            await self.commands.wait_idle(self.shutdown_timeout / 4)
            watch.cancel()
            beat.cancel()
        await self._publish_status(client, "offline", reason="stopped")
        self._drained = True

    async def _watch(self, client: aiomqtt.Client) -> None:
        # Raises MqttError as soon as the connection drops, rather than when
        # a publish times out.
        hive_status = topics.hive_status_topic(self.config.mqtt.topic_prefix)
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                continue
            topic = str(message.topic)
            if topic == self.topic(topics.RECEIPTS):
                self._receipt(bytes(payload))
            elif topic == hive_status:
                self._hive_status(bytes(payload))
            else:
                self.commands.submit(client, topic, bytes(payload))

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

    def depth(self) -> int:
        """Events not yet receipted: in memory and in the spool."""
        spooled = len(self.spool) if self.spool is not None else 0
        return self._queue.qsize() + len(self._pending) + spooled

    def heartbeat(self) -> dict[str, Any]:
        """The heartbeat's payload: liveness, counters, queue and spool."""
        depth = self.depth()
        self.metrics.set("agent.queue_depth", depth)
        counters = self.metrics.snapshot()
        spool = self.spool
        return {
            "v": SCHEMA_VERSION,
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
            "spool": {
                "depth": len(spool) if spool is not None else 0,
                "dropped": spool.dropped if spool is not None else 0,
            },
        }

    # --- Into the spool ------------------------------------------------------

    async def _spooler(self) -> None:
        """Move queued events into the spool until the stop marker comes."""
        assert self.spool is not None
        stopped = False
        while not stopped:
            stopped = await self._fill()
            if self._pending:
                self._append([self.encode_event(e) for e in self._pending])
                self._pending = []
        self._spooler_done = True
        self._spooled.set()

    def _append(self, rows: list[bytes]) -> None:
        assert self.spool is not None
        dropped = self.spool.append(rows)
        if dropped:
            self.metrics.inc("agent.spool_dropped", dropped)
            logger.warning(
                "Spool full (%d events): dropped the %d oldest, %d so far; the "
                "hive is told in heartbeats.",
                self.spool.max_events,
                dropped,
                self.spool.dropped,
            )
        self.metrics.set("agent.spool_depth", len(self.spool))
        self._spooled.set()

    def encode_event(self, event: Event) -> bytes:
        """An event's JSON, shortened to fit one message when it must."""
        raw = encode(event)
        limit = self.config.agent.batch_max_bytes - ENVELOPE_BYTES
        if len(raw) > limit:
            raw = encode(shorten(event, limit))
            self.metrics.inc("agent.events_shortened")
        return raw

    def batch_payload(self, rows: list[tuple[int, bytes]]) -> bytes:
        """The MQTT payload of spooled events: the envelope and their range."""
        head = b'{"v":%d,"agent_id":"%s","seq":[%d,%d],"events":[' % (
            SCHEMA_VERSION,
            self.agent_id.encode(),
            rows[0][0],
            rows[-1][0],
        )
        return head + b",".join(row for _, row in rows) + b"]}"

    # --- Out of the spool ----------------------------------------------------

    async def _batches(self, client: aiomqtt.Client) -> None:
        """Publish the spool in order until, stopping, all is receipted.

        At most ``spool_window`` batches wait for a receipt at once. Batches
        not receipted within ``receipt_timeout`` (the hive was away, or a
        receipt was lost) are sent again, from the oldest.
        """
        assert self.spool is not None
        agent, topic, cursor = self.config.agent, self.topic(topics.EVENTS), 0
        while True:
            self._spooled.clear()
            cursor = self._resend_if_late(cursor)
            rows: list[tuple[int, bytes]] = []
            if len(self._inflight) < agent.spool_window:
                rows = self.spool.read(
                    cursor,
                    max_events=agent.batch_max_events,
                    max_bytes=agent.batch_max_bytes - ENVELOPE_BYTES,
                )
            if rows:
                # In flight before the publish: the receipt may come back
                # before the PUBACK does.
                cursor = rows[-1][0]
                self._inflight[cursor] = (rows[0][0], time.monotonic())
                await client.publish(topic, self.batch_payload(rows), qos=1)
                self.metrics.inc("agent.events_sent", len(rows))
                self.metrics.inc("agent.batches_sent")
                continue
            if self._spooler_done and not len(self.spool):
                return
            if not await self._wait_for_spool():
                logger.warning(
                    "Stopping before the hive receipted %d events; they stay in "
                    "the spool %s for the next start.",
                    len(self.spool),
                    self.spool.path,
                )
                return

    async def _wait_for_spool(self) -> bool:
        """Wait for events or receipts; False when stopping and none came."""
        timeout = min(1.0, self.config.agent.receipt_timeout)
        if self._spooler_done:
            # Stopping: give the hive a moment to receipt, then leave the rest
            # in the spool for the next start.
            timeout = self.shutdown_timeout / 2
        try:
            await asyncio.wait_for(self._spooled.wait(), timeout)
        except TimeoutError:
            return not self._spooler_done
        return True

    def _resend_if_late(self, cursor: int) -> int:
        if self._rewind_requested:
            self._rewind_requested = False
            return self._rewind()
        if not self._inflight:
            return cursor
        oldest = min(sent for _, sent in self._inflight.values())
        if time.monotonic() - oldest < self.config.agent.receipt_timeout:
            return cursor
        logger.info(
            "No receipt for %d batches in %.0f s; sending them again.",
            len(self._inflight),
            self.config.agent.receipt_timeout,
        )
        return self._rewind()

    def _rewind(self) -> int:
        self.metrics.inc("agent.resent", len(self._inflight))
        self._inflight.clear()
        self._spooled.set()
        return 0

    def _receipt(self, payload: bytes) -> None:
        """The hive stored a batch: delete its events from the spool."""
        assert self.spool is not None
        try:
            receipt = msgspec.json.decode(payload, type=Receipt)
        except msgspec.DecodeError as exc:
            self.metrics.inc("agent.bad_receipts")
            logger.warning("Ignoring an invalid receipt: %s.", exc)
            return
        first, last = receipt.seq
        self._inflight.pop(last, None)
        self.spool.remove(first, last)
        self.metrics.set("agent.spool_depth", len(self.spool))
        self._spooled.set()

    def _hive_status(self, payload: bytes) -> None:
        # A hive that (re)started may have missed batches sent while it was
        # down; send what is not receipted again rather than wait.
        try:
            status = msgspec.json.decode(payload, type=HiveStatus)
        except msgspec.DecodeError:
            return
        if status.status == "online" and status.since != self._hive_since:
            if self._hive_since is not None and self._inflight:
                logger.info("The hive is back online; resending what it missed.")
                self._rewind_requested = True
            self._hive_since = status.since
            self._spooled.set()

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
        return True


class Receipt(msgspec.Struct):
    """The hive's word that it stored the spooled events ``seq[0]..seq[1]``."""

    seq: tuple[int, int]


class HiveStatus(msgspec.Struct):
    status: str
    since: int | None = None


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
