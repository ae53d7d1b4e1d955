"""The hive: bus, storage and plugins, started and stopped together.

A plugin receives the :class:`Hive` in its hooks and uses it to publish on the
bus, raise alerts, keep dead letters and reach storage. The hive itself
subscribes storage to every event and alert.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import operator
import time
from collections.abc import Coroutine, Iterable
from typing import Any

import orjson

from immune.bus import Bus, Subscription, check_pattern
from immune.config import Config
from immune.dedup import Deduplicator
from immune.errors import StorageError
from immune.events import (
    EVENT_TOPICS,
    SEVERITY_RANK,
    Alert,
    Event,
    Severity,
    encode,
    new_id,
    now_ns,
    to_dict,
)
from immune.manager import PluginInfo, PluginManager
from immune.metrics import Metrics
from immune.safe import printable
from immune.storage import Store

logger = logging.getLogger(__name__)


class Hive:
    """The running hive.

    Args:
        config: the configuration (``immune.config.load()``).
        metrics: counters; a new set when None.
        store: storage; by default one on ``config.hive.database``.
        plugins: extra ``(name, plugin)`` pairs to register besides those
            found in entry points and plugin directories (tests, embedders).
        discover: load plugins from entry points and plugin directories.
    """

    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics | None = None,
        store: Store | None = None,
        plugins: Iterable[tuple[str, Any]] = (),
        discover: bool = True,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.store = store or Store(
            config.hive.database, config=config.storage, metrics=self.metrics
        )
        self.bus = Bus(
            shards=config.hive.bus_shards,
            queue_size=config.hive.bus_queue_size,
            metrics=self.metrics,
            on_error=self._keep_failed_message,
        )
        self.plugins = PluginManager(
            disabled=config.hive.disabled_plugins, plugin_dirs=config.hive.plugin_dirs
        )
        self._extra_plugins = list(plugins)
        self._discover = discover
        self._tasks: list[asyncio.Task[Any]] = []
        self._started: list[PluginInfo] = []
        self.stopping = asyncio.Event()
        self.started_ns = 0
        self._last_warning: dict[str, float] = {}
        self.dedup = Deduplicator(
            config.hive.alert_window,
            max_event_ids=config.hive.alert_max_event_ids,
            rule_windows=config.hive.alert_rule_windows,
        )
        #: Agent id to "online" or "offline", as the transport last saw it.
        self.agent_status: dict[str, str] = {}

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Migrate the database, load and start plugins, start the bus."""
        self.started_ns = now_ns()
        await asyncio.to_thread(self.store.upgrade)
        await self.store.start()
        self.bus.subscribe("event.#", self.store.offer_event, owner="storage")
        self.bus.subscribe("alert.#", self.store.add_alert, owner="storage")
        self.bus.subscribe("alert_update.#", self.store.add_alert, owner="storage")

        self._load_plugins()
        for info in list(self.plugins.active()):
            await self._start_plugin(info)
        self.bus.start()
        names = ", ".join(p.name for p in self._started) or "none"
        logger.info("Hive started with plugins: %s.", names)

    def _load_plugins(self) -> None:
        if self._discover:
            self.plugins.load_all()
        for name, obj in self._extra_plugins:
            self.plugins.register(obj, name)

    async def _prepare_plugin(self, info: PluginInfo) -> list[tuple[str, Any]] | None:
        """Configure a plugin and get its subscriptions; None if it failed."""
        table = self.config.plugins.get(info.name, {})
        stage = "immune_configure"
        try:
            await _maybe_await(
                self.plugins.call_one(info, stage, hive=self, config=table)
            )
            stage = "immune_subscriptions"
            result = await _maybe_await(self.plugins.call_one(info, stage, hive=self))
            subs = list(result or [])
            for pattern, _handler in subs:
                check_pattern(pattern)  # a bad one fails the plugin now
            info.topics = [pattern for pattern, _handler in subs]
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - one plugin must not stop the hive
            self.plugins.fail(info, stage, exc)
            self.metrics.inc("plugins.failed")
            return None
        return subs

    async def _start_plugin(self, info: PluginInfo) -> None:
        subs = await self._prepare_plugin(info)
        if subs is None:
            return
        try:
            for pattern, handler in subs:
                self.bus.subscribe(pattern, handler, owner=info.name)
            await _maybe_await(self.plugins.call_one(info, "immune_start", hive=self))
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - one plugin must not stop the hive
            self.bus.unsubscribe_owner(info.name)
            self.plugins.fail(info, "immune_start", exc)
            self.metrics.inc("plugins.failed")
            return
        info.state = "running"
        self._started.append(info)

    async def describe_plugins(self) -> list[PluginInfo]:
        """Load and configure plugins without starting them, for listings."""
        self._load_plugins()
        for info in list(self.plugins.active()):
            await self._prepare_plugin(info)
        return self.plugins.list()

    async def stop(self) -> None:
        """Stop sources, deliver what is queued, stop plugins, flush storage."""
        self.stopping.set()
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=10)
            for task in pending:
                logger.warning(
                    "Task %s did not stop in 10 s; cancelled.", task.get_name()
                )
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.bus.stop()
        for info in reversed(self._started):
            try:
                await _maybe_await(
                    self.plugins.call_one(info, "immune_stop", hive=self)
                )
                info.state = "stopped"
            except (Exception, SystemExit) as exc:  # noqa: BLE001
                self.plugins.fail(info, "immune_stop", exc)
        self._started.clear()
        try:
            await self.store.stop(timeout=self.config.hive.shutdown_timeout)
        except StorageError as exc:
            # Say plainly what is lost rather than hang on a dead database.
            self.metrics.inc("storage.lost_at_stop", self.store.pending)
            logger.critical("Stopping with unwritten data: %s.", exc)
            raise
        logger.info("Hive stopped.")

    async def __aenter__(self) -> Hive:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def create_task(
        self, coro: Coroutine[Any, Any, Any], name: str
    ) -> asyncio.Task[Any]:
        """Run a plugin's long-lived coroutine; it should end when ``stopping`` is set.

        A task that ends with an exception is logged and counted.
        """
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        # Forget finished tasks: plugins start one per playbook run or retry.
        if task in self._tasks:
            self._tasks.remove(task)
        if task.cancelled() or task.exception() is None:
            return
        self.metrics.inc("hive.task_errors")
        exc = task.exception()
        logger.error(
            "Task %s failed: %s", task.get_name(), printable(exc), exc_info=exc
        )

    async def sleep(self, seconds: float) -> bool:
        """Wait ``seconds``, or less if the hive stops meanwhile.

        Returns True when the time ran out and False when the hive is
        stopping, so that a plugin's periodic task reads
        ``while await hive.sleep(30): ...`` and ends with the hive.
        """
        return await wait_unless(self.stopping, seconds)

    def agents_online(self) -> int:
        return sum(1 for status in self.agent_status.values() if status == "online")

    # -- what plugins use --------------------------------------------------

    async def publish(
        self, topic: str, message: Any, *, key: str | None = None
    ) -> None:
        """Publish on the bus (see :meth:`immune.bus.Bus.publish`)."""
        await self.bus.publish(topic, message, key=key)

    async def ingest(self, events: Iterable[Event]) -> None:
        """Put validated events on the bus, keyed by agent to keep their order."""
        # Runs of events from one agent (a whole MQTT batch, usually) cross
        # the bus as one publication.
        for agent_id, run in itertools.groupby(events, key=_AGENT_OF):
            items = [(EVENT_TOPICS[event.kind], event) for event in run]
            await self.bus.publish_many(items, key=agent_id)
            self.metrics.inc("events.accepted", len(items))

    async def raise_alert(
        self,
        *,
        rule: str,
        title: str,
        severity: Severity,
        plugin: str,
        events: Iterable[Event] = (),
        techniques: Iterable[str] = (),
        description: str = "",
        data: dict[str, Any] | None = None,
        key: str | None = None,
    ) -> Alert:
        """Build an alert from the events that caused it and publish it.

        An alert of the same rule, severity and agent (and ``key``) within
        the suppression window updates the first one instead (see
        :mod:`immune.dedup`): its count grows, and it is published on
        ``alert_update.<severity>``, where storage updates its row; that one
        is returned.

        Args:
            rule: a stable identifier of the rule or signature that fired.
            title: one line for a person.
            severity: ``info`` to ``critical``.
            plugin: the plugin raising it.
            events: the events behind it; the first gives agent and host.
            techniques: MITRE ATT&CK technique ids (``T1059.004``).
            key: what else tells two alerts of one rule apart (an
                indicator, a user); the agent always does.
        """
        if severity not in SEVERITY_RANK:
            msg = f"severity {severity!r} is not one of {', '.join(SEVERITY_RANK)}"
            raise ValueError(msg)
        events = list(events)
        first = events[0] if events else None
        alert = Alert(
            id=new_id(),
            ts=now_ns(),
            rule=rule,
            title=title,
            severity=severity,
            plugin=plugin,
            agent_id=first.agent_id if first else None,
            host=first.host if first else None,
            event_ids=[e.id for e in events],
            techniques=list(techniques),
            description=description,
            data=data or {},
        )
        alert, status = self.dedup.fold(alert, key)
        if status == "new":
            self.metrics.inc("alerts.raised")
            await self.bus.publish(alert.topic, alert, key=alert.agent_id)
        elif status == "updated":
            self.metrics.inc("alerts.deduplicated")
            topic = f"alert_update.{alert.severity}"
            await self.bus.publish(topic, alert, key=alert.agent_id)
        else:
            self.metrics.inc("alerts.redelivered")
        return alert

    async def dead_letter(
        self, source: str, reason: str, payload: bytes | None = None, raw: Any = None
    ) -> None:
        """Keep something the hive could not use, with the reason, and count it."""
        self.metrics.inc("deadletters")
        self._warn_rarely(
            source, "Rejected input from %s: %s", printable(source), printable(reason)
        )
        if payload is None and raw is not None:
            payload = orjson.dumps(raw, default=str)
        await self.store.add_dead_letter(source, reason, payload)

    async def _keep_failed_message(
        self, topic: str, message: Any, sub: Subscription, exc: BaseException
    ) -> None:
        # Keep what a plugin failed on so that it can be looked at and replayed.
        raw = to_dict(message) if hasattr(message, "__struct_fields__") else message
        payload = encode({"topic": topic, "message": raw})
        reason = f"plugin {sub.owner} failed on {topic}: {type(exc).__name__}: {exc}"
        self.metrics.inc("deadletters")
        await self.store.add_dead_letter(f"plugin:{sub.owner}", reason, payload)

    def _warn_rarely(self, key: str, msg: str, *args: Any) -> None:
        # Bad input can arrive thousands of times a second; log one line per
        # source a second and let the counters tell the rest.
        now = time.monotonic()
        if now - self._last_warning.get(key, 0.0) >= 1.0:
            self._last_warning[key] = now
            logger.warning(msg, *args)


async def wait_unless(event: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` unless ``event`` is set first; True if the time ran out."""
    if event.is_set():
        return False
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return True
    return False


_AGENT_OF = operator.attrgetter("agent_id")


async def _maybe_await(value: Any) -> Any:
    # Hooks may be plain functions or coroutine functions (or return an
    # awaitable); the hive accepts either.
    if inspect.isawaitable(value):
        return await value
    return value
