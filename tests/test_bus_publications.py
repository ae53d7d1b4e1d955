"""One coroutine per publication keeps failures, nesting and loops as before."""

from __future__ import annotations

import asyncio

from immune.bus import MAX_DEPTH, Bus, BusError
from immune.metrics import Metrics


async def test_failure_mid_batch_spares_the_rest_of_the_batch() -> None:
    failures: list[tuple[str, object]] = []

    async def on_error(topic, message, sub, exc) -> None:  # noqa: ANN001
        failures.append((topic, message))

    metrics = Metrics()
    bus = Bus(shards=1, metrics=metrics, on_error=on_error)
    got: list[tuple[str, int]] = []

    def picky(n: int) -> None:
        if n % 3 == 0:
            raise ValueError(n)
        got.append(("picky", n))

    async def slow(n: int) -> None:
        await asyncio.sleep(0)
        got.append(("slow", n))

    bus.subscribe("e.#", picky, owner="picky")
    bus.subscribe("e.#", slow, owner="slow")
    bus.start()
    await bus.publish_many([(f"e.{n}", n) for n in range(7)], key="k")
    await asyncio.wait_for(bus.stop(), 5)
    expected = []
    for n in range(7):
        if n % 3:
            expected.append(("picky", n))
        expected.append(("slow", n))
    assert got == expected
    assert failures == [("e.0", 0), ("e.3", 3), ("e.6", 6)]
    assert metrics.get("bus.handler_errors.picky") == 3
    assert metrics.get("bus.delivered") == 7


async def test_nested_publish_many_is_inline_in_order_with_failures() -> None:
    failures: list[str] = []

    async def on_error(topic, message, sub, exc) -> None:  # noqa: ANN001
        failures.append(topic)

    bus = Bus(shards=2, queue_size=1, on_error=on_error)
    log: list[str] = []

    async def detector(event: str) -> None:
        log.append(f"saw {event}")
        await bus.publish_many(
            [
                ("alert.a", f"a {event}"),
                ("alert.bad", f"b {event}"),
                ("alert.c", f"c {event}"),
            ]
        )
        log.append(f"done {event}")

    def alerts(message: str) -> None:
        if message.startswith("b "):
            raise RuntimeError(message)
        log.append(message)

    bus.subscribe("event.exec", detector)
    bus.subscribe("alert.#", alerts)
    bus.start()
    for e in ("e1", "e2"):
        await bus.publish("event.exec", e, key=e)
        await bus.join()
    await asyncio.wait_for(bus.stop(), 5)
    assert log == [
        x for e in ("e1", "e2") for x in (f"saw {e}", f"a {e}", f"c {e}", f"done {e}")
    ]
    assert failures == ["alert.bad", "alert.bad"]


async def test_loop_guard_fires_through_publish_many_at_max_depth() -> None:
    errors: list[tuple[str, BaseException]] = []
    depths: list[int] = []

    async def on_error(topic, message, sub, exc) -> None:  # noqa: ANN001
        errors.append((topic, exc))

    bus = Bus(on_error=on_error)

    async def echo(n: int) -> None:
        depths.append(n)
        await bus.publish_many([("loop.x", n + 1), ("loop.y", n + 1)])

    bus.subscribe("loop.x", echo)
    bus.start()
    await bus.publish("loop.x", 0)
    await asyncio.wait_for(bus.stop(), 5)
    assert depths == list(range(MAX_DEPTH))
    # Only the innermost handler's publish is refused, and reported once.
    ((topic, exc),) = errors
    assert topic == "loop.x" and isinstance(exc, BusError) and "loop" in str(exc)
