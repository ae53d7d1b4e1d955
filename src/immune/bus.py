"""The event bus: topics, wildcard subscriptions, bounded ordered queues.

Topics are dotted lower-case words (``event.exec``, ``alert.high``). A
subscription pattern may use ``*`` for exactly one word and ``#``, as its last
word, for any number of words (none included): ``event.*``, ``alert.#``, ``#``.

Messages are spread over a few shards by key (the agent id for events); each
shard is a bounded queue drained by one task, so the messages of one agent are
handled in the order they were published. A full queue makes ``publish`` wait
(backpressure) rather than drop anything.

Dispatch looks the topic up in an index built from the subscriptions, so it
costs one dict lookup and then a call per interested handler, whatever the
number of plugins. A handler that raises is logged and counted, the message is
handed to ``on_error`` (the hive keeps it as a dead letter), and the other
handlers still run.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from inspect import isawaitable
from typing import Any

from immune.errors import ImmuneError
from immune.metrics import Metrics
from immune.safe import printable

logger = logging.getLogger(__name__)

Handler = Callable[[Any], Awaitable[None] | None]
ErrorHook = Callable[[str, Any, "Subscription", BaseException], Awaitable[None]]

# How deep publishes made from inside handlers may nest before we call it a
# loop (a handler that republishes what it receives).
MAX_DEPTH = 16
_depth: contextvars.ContextVar[int] = contextvars.ContextVar(
    "immune_bus_depth", default=0
)


class BusError(ImmuneError):
    """A misuse of the bus: a bad pattern or topic, or a publishing loop."""


@dataclass(eq=False)
class Subscription:
    """A handler bound to a topic pattern, on behalf of an owner (a plugin)."""

    pattern: str
    handler: Handler
    owner: str = "core"
    is_async: bool = field(init=False)
    _words: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._words = tuple(check_pattern(self.pattern))
        # An async callable object counts too; a sync handler that returns an
        # awaitable is awaited by the dispatcher anyway.
        call = getattr(type(self.handler), "__call__", None)  # noqa: B004
        self.is_async = inspect.iscoroutinefunction(
            self.handler
        ) or inspect.iscoroutinefunction(call)

    def matches(self, topic: str) -> bool:
        return _match(self._words, topic.split("."))


def check_pattern(pattern: str) -> list[str]:
    """Split a subscription pattern into words, refusing malformed ones."""
    words = pattern.split(".")
    for index, word in enumerate(words):
        if not word:
            raise BusError(f"empty word in topic pattern {pattern!r}")
        if word == "#" and index != len(words) - 1:
            raise BusError(f"'#' must be the last word of pattern {pattern!r}")
        if ("#" in word or "*" in word) and word not in ("#", "*"):
            raise BusError(f"wildcards must stand alone in pattern {pattern!r}")
    return words


def _match(words: tuple[str, ...] | list[str], parts: list[str]) -> bool:
    for index, word in enumerate(words):
        if word == "#":
            return True
        if index >= len(parts):
            return False
        if word != "*" and word != parts[index]:
            return False
    return len(words) == len(parts)


class Bus:
    """An asyncio publish/subscribe bus with ordered, bounded shards.

    Args:
        shards: number of queues (and draining tasks); messages with the same
            key always go to the same shard.
        queue_size: capacity of each shard, in publications (a batch published
            with :meth:`publish_many` takes one place); publishers wait when
            it is full.
        metrics: where to count messages, waits and handler errors.
        on_error: awaited with (topic, message, subscription, exception) when
            a handler raises; the hive stores such messages for replay.
    """

    def __init__(
        self,
        *,
        shards: int = 4,
        queue_size: int = 10_000,
        metrics: Metrics | None = None,
        on_error: ErrorHook | None = None,
    ) -> None:
        if shards < 1 or queue_size < 1:
            raise BusError("a bus needs at least one shard of capacity one")
        self.metrics = metrics or Metrics()
        self.on_error = on_error
        self._subs: list[Subscription] = []
        self._index: dict[str, tuple[Subscription, ...]] = {}
        self._queues = [
            asyncio.Queue[list[tuple[str, Any]]](queue_size) for _ in range(shards)
        ]
        self._tasks: list[asyncio.Task[None]] = []

    # -- subscriptions -----------------------------------------------------

    def subscribe(
        self, pattern: str, handler: Handler, *, owner: str = "core"
    ) -> Subscription:
        """Call ``handler(message)`` for every message on a matching topic.

        Args:
            pattern: a topic pattern, ``*`` and ``#`` allowed (see module doc).
            handler: a function or coroutine function taking the message.
            owner: who subscribed (a plugin name), for counters and logs.
        """
        sub = Subscription(pattern, handler, owner)
        self._subs.append(sub)
        self._index.clear()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.remove(sub)
        self._index.clear()

    def unsubscribe_owner(self, owner: str) -> None:
        """Remove every subscription of one owner (a plugin being stopped)."""
        self._subs = [s for s in self._subs if s.owner != owner]
        self._index.clear()

    def handlers_for(self, topic: str) -> tuple[Subscription, ...]:
        """The subscriptions a topic is delivered to, in subscription order."""
        subs = self._index.get(topic)
        if subs is None:
            parts = topic.split(".")
            subs = tuple(s for s in self._subs if _match(s._words, parts))
            self._index[topic] = subs
        return subs

    # -- publishing --------------------------------------------------------

    async def publish(
        self, topic: str, message: Any, *, key: str | None = None
    ) -> None:
        """Publish a message.

        From outside the bus the message is queued on the shard of ``key``
        (waiting while that shard is full). From inside a handler it is
        delivered at once, in the same task, so that what a handler concludes
        stays in order with what it saw and a full queue cannot deadlock the
        handler that fills it.

        Args:
            topic: dotted words, no wildcards.
            message: any object; events and alerts are msgspec structs.
            key: ordering key; messages with equal keys are handled in order.
        """
        await self.publish_many([(topic, message)], key=key)

    async def publish_many(
        self, items: list[tuple[str, Any]], *, key: str | None = None
    ) -> None:
        """Publish several ``(topic, message)`` pairs with one ordering key.

        They take one place in the shard's queue, which is how a batch of
        events from one agent crosses the bus without paying for a queue
        operation per event.
        """
        for topic, _message in items:
            if not topic or "*" in topic or "#" in topic:
                msg = f"cannot publish on {topic!r}: topics have no wildcards"
                raise BusError(msg)
        depth = _depth.get()
        if depth:
            if depth >= MAX_DEPTH:
                msg = f"publishing loop on {items[0][0]!r}: nested {depth} deep"
                raise BusError(msg)
            token = _depth.set(depth + 1)
            try:
                await self._deliver(items)
            finally:
                _depth.reset(token)
            return
        queue = self._queues[hash(key) % len(self._queues) if key else 0]
        if queue.full():
            self.metrics.inc("bus.backpressure_waits")
        await queue.put(items)
        self.metrics.inc("bus.published", len(items))

    async def _deliver(self, items: list[tuple[str, Any]]) -> None:
        # The caller has marked the task as dispatching (see _depth). One
        # coroutine for the whole publication: one per message would cost
        # more than most handlers do.
        for topic, message in items:
            for sub in self.handlers_for(topic):
                try:
                    result = sub.handler(message)
                    if sub.is_async or (result is not None and isawaitable(result)):
                        await result  # type: ignore[misc]  # checked just above
                except Exception as exc:  # noqa: BLE001 - one plugin must not stop others
                    await self._handler_failed(topic, message, sub, exc)

    async def _handler_failed(
        self, topic: str, message: Any, sub: Subscription, exc: Exception
    ) -> None:
        self.metrics.inc("bus.handler_errors")
        self.metrics.inc(f"bus.handler_errors.{sub.owner}")
        # The exception's text may carry event data: one escaped line.
        logger.error(
            "Handler %s of %s failed on %s: %s",
            _name(sub.handler),
            sub.owner,
            topic,
            printable(exc),
            exc_info=exc,
        )
        if self.on_error is not None:
            try:
                await self.on_error(topic, message, sub, exc)
            except Exception:  # noqa: BLE001 - the error path must not kill a shard
                logger.exception(
                    "Could not keep the message that %s failed on.", sub.owner
                )

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Start one draining task per shard."""
        if self._tasks:
            return
        for number, queue in enumerate(self._queues):
            task = asyncio.create_task(
                self._drain(queue), name=f"immune-bus-shard-{number}"
            )
            self._tasks.append(task)

    async def _drain(self, queue: asyncio.Queue[list[tuple[str, Any]]]) -> None:
        while True:
            items = await queue.get()
            token = _depth.set(1)
            try:
                await self._deliver(items)
                self.metrics.inc("bus.delivered", len(items))
            finally:
                _depth.reset(token)
                queue.task_done()
            if not queue.empty():
                # A queue that is never empty would keep this task running
                # without a pause (get() does not wait then): let the other
                # tasks (storage handing rows to its writer, the MQTT client)
                # run between two publications.
                await asyncio.sleep(0)

    async def join(self) -> None:
        """Wait until every queued message has been handled."""
        for queue in self._queues:
            await queue.join()

    async def stop(self) -> None:
        """Handle what is queued, then stop the shard tasks."""
        if self._tasks:
            await self.join()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def depth(self) -> int:
        """Messages waiting in all shards."""
        return sum(q.qsize() for q in self._queues)


def _name(handler: Handler) -> str:
    return getattr(handler, "__qualname__", None) or repr(handler)
