"""The event bus: matching, ordering, backpressure, isolation of failures."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from immune.bus import Bus, BusError, _match, check_pattern
from immune.metrics import Metrics

words = st.sampled_from(["event", "alert", "exec", "high", "a", "b"])
topics = st.lists(words, min_size=1, max_size=5).map(".".join)


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("event.exec", "event.exec", True),
        ("event.exec", "event.fork", False),
        ("event.*", "event.exec", True),
        ("event.*", "event", False),
        ("event.*", "event.exec.x", False),
        ("alert.#", "alert", True),
        ("alert.#", "alert.high", True),
        ("alert.#", "alert.high.x", True),
        ("alert.#", "alerts.high", False),
        ("#", "anything.at.all", True),
        ("*.exec", "event.exec", True),
        ("*.exec", "event.fork", False),
    ],
)
def test_bus_pattern_matching(pattern: str, topic: str, expected: bool) -> None:
    assert _match(check_pattern(pattern), topic.split(".")) is expected


@given(topics)
def test_bus_hash_matches_everything_and_exact_matches_itself(topic: str) -> None:
    assert _match(check_pattern("#"), topic.split("."))
    assert _match(check_pattern(topic), topic.split("."))


@given(topics, topics)
def test_bus_exact_pattern_matches_only_equal_topic(pattern: str, topic: str) -> None:
    assert _match(check_pattern(pattern), topic.split(".")) is (pattern == topic)


@pytest.mark.parametrize("bad", ["", "a..b", "a.#.b", "a.b*", "x#"])
def test_bus_bad_pattern_refused(bad: str) -> None:
    with pytest.raises(BusError):
        check_pattern(bad)


async def test_bus_publish_refuses_wildcard_topic() -> None:
    bus = Bus()
    with pytest.raises(BusError, match="no wildcards"):
        await bus.publish("event.*", {})


async def test_bus_delivers_to_every_matching_handler_once() -> None:
    bus = Bus(shards=2)
    got: dict[str, list[str]] = {"exact": [], "star": [], "hash": [], "other": []}
    bus.subscribe("event.exec", lambda m: got["exact"].append(m))
    bus.subscribe("event.*", lambda m: got["star"].append(m))

    async def on_any(m: str) -> None:
        got["hash"].append(m)

    bus.subscribe("#", on_any)
    bus.subscribe("alert.#", lambda m: got["other"].append(m))
    bus.start()
    await bus.publish("event.exec", "e1", key="a")
    await bus.publish("event.fork", "f1", key="a")
    await bus.stop()
    assert got == {
        "exact": ["e1"],
        "star": ["e1", "f1"],
        "hash": ["e1", "f1"],
        "other": [],
    }


async def test_bus_keeps_order_per_key_across_shards() -> None:
    bus = Bus(shards=4, queue_size=8)
    seen: dict[str, list[int]] = {}

    async def handler(msg: tuple[str, int]) -> None:
        key, n = msg
        if n % 7 == 0:
            await asyncio.sleep(0)  # let other shards interleave
        seen.setdefault(key, []).append(n)

    bus.subscribe("event.exec", handler)
    bus.start()
    for n in range(200):
        for key in ("agent-a", "agent-b", "agent-c"):
            await bus.publish("event.exec", (key, n), key=key)
    await bus.stop()
    assert seen == {k: list(range(200)) for k in ("agent-a", "agent-b", "agent-c")}


async def test_bus_full_queue_makes_publisher_wait_and_loses_nothing() -> None:
    metrics = Metrics()
    bus = Bus(shards=1, queue_size=2, metrics=metrics)
    release = asyncio.Event()
    got: list[int] = []

    async def slow(n: int) -> None:
        await release.wait()
        got.append(n)

    bus.subscribe("t.x", slow)
    bus.start()
    publisher = asyncio.create_task(_publish_many(bus, 10))
    await asyncio.sleep(0.05)
    assert not publisher.done()  # blocked: the queue holds 2, one in the handler
    assert metrics.get("bus.backpressure_waits") >= 1
    release.set()
    await publisher
    await bus.stop()
    assert got == list(range(10))


async def _publish_many(bus: Bus, n: int) -> None:
    for i in range(n):
        await bus.publish("t.x", i, key="k")


async def test_bus_failing_handler_is_isolated_counted_and_reported() -> None:
    failures: list[tuple[str, object, str]] = []

    async def on_error(topic, message, sub, exc) -> None:  # noqa: ANN001
        failures.append((topic, message, sub.owner))

    metrics = Metrics()
    bus = Bus(metrics=metrics, on_error=on_error)
    got: list[int] = []

    def boom(n: int) -> None:
        raise ValueError("broken plugin")

    bus.subscribe("t.x", boom, owner="bad")
    bus.subscribe("t.x", got.append, owner="good")
    bus.start()
    for n in range(3):
        await bus.publish("t.x", n)
    await bus.stop()
    assert got == [0, 1, 2]
    assert metrics.get("bus.handler_errors.bad") == 3
    assert failures == [("t.x", 0, "bad"), ("t.x", 1, "bad"), ("t.x", 2, "bad")]


async def test_bus_publish_from_handler_is_delivered_inline_in_order() -> None:
    bus = Bus(shards=1, queue_size=1)
    log: list[str] = []

    async def detector(event: str) -> None:
        log.append(f"saw {event}")
        await bus.publish("alert.high", f"alert for {event}")
        log.append(f"done {event}")

    bus.subscribe("event.exec", detector)
    bus.subscribe("alert.#", lambda a: log.append(a))
    bus.start()
    for e in ("e1", "e2", "e3"):  # queue of 1: inline publish must not deadlock
        await bus.publish("event.exec", e)
    await asyncio.wait_for(bus.stop(), 5)
    assert log == [
        x
        for e in ("e1", "e2", "e3")
        for x in (f"saw {e}", f"alert for {e}", f"done {e}")
    ]


async def test_bus_publishing_loop_is_stopped_and_reported() -> None:
    errors: list[BaseException] = []

    async def on_error(topic, message, sub, exc) -> None:  # noqa: ANN001
        errors.append(exc)

    bus = Bus(on_error=on_error)

    async def echo(msg: int) -> None:
        await bus.publish("loop.x", msg + 1)

    bus.subscribe("loop.x", echo)
    bus.start()
    await bus.publish("loop.x", 0)
    await asyncio.wait_for(bus.stop(), 5)
    assert errors and isinstance(errors[0], BusError)
    assert "loop" in str(errors[0])


async def test_bus_index_updates_when_subscriptions_change() -> None:
    bus = Bus()
    first = bus.subscribe("event.exec", lambda m: None, owner="p1")
    assert bus.handlers_for("event.exec") == (first,)
    second = bus.subscribe("event.*", lambda m: None, owner="p2")
    assert bus.handlers_for("event.exec") == (first, second)
    bus.unsubscribe_owner("p1")
    assert bus.handlers_for("event.exec") == (second,)
    bus.unsubscribe(second)
    assert bus.handlers_for("event.exec") == ()


async def test_bus_backlog_leaves_other_tasks_their_turn() -> None:
    # A shard with publications waiting does not wait in get(): without a
    # pause between publications it would keep the loop from every other
    # task (storage handing rows to its writer, the MQTT client) until its
    # backlog is gone.
    bus = Bus(shards=1, queue_size=1000)
    delivered = 0
    seen_by_other_task: list[int] = []

    def handler(_message: object) -> None:
        nonlocal delivered
        delivered += 1

    async def other_task() -> None:
        while delivered < 100 * 50:
            seen_by_other_task.append(delivered)
            await asyncio.sleep(0)

    bus.subscribe("event.#", handler)
    for _ in range(100):
        await bus.publish_many([("event.exec", None)] * 50, key="a")
    bus.start()
    other = asyncio.create_task(other_task())
    await bus.join()
    await other
    await bus.stop()
    assert delivered == 5000
    # The other task ran while the backlog was being delivered, not after.
    during = [n for n in seen_by_other_task if 0 < n < 5000]
    assert len(during) >= 50


async def test_bus_failing_handler_text_is_logged_on_one_escaped_line(caplog) -> None:  # noqa: ANN001
    # An exception's text can carry event data (a path, a command line): it
    # must not forge a log line or drive the operator's terminal.
    bus = Bus()

    def boom(message: str) -> None:
        raise ValueError(f"bad value {message}")

    bus.subscribe("t.x", boom, owner="bad")
    bus.start()
    await bus.publish("t.x", "x\n2026-12-04 CRITICAL forged\x1b[2J")
    await bus.stop()
    (record,) = [r for r in caplog.records if r.name == "immune.bus"]
    line = record.getMessage()
    assert "\n" not in line and "\x1b" not in line
    assert "bad value x\\n2026-12-04 CRITICAL forged\\x1b[2J" in line
