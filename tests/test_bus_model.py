"""A model-based test of the bus: whatever the sequence of subscriptions and
publications, each handler receives exactly what a naive matcher says it
should, in publication order per key."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from immune.bus import Bus

WORDS = ["event", "alert", "exec", "high", "x"]
topics = st.lists(st.sampled_from(WORDS), min_size=1, max_size=3).map(".".join)
patterns = (
    st.lists(st.sampled_from([*WORDS, "*"]), min_size=1, max_size=3).map(".".join)
    | topics.map(lambda t: t + ".#")
    | st.just("#")
)


def naive_match(pattern: str, topic: str) -> bool:
    p, t = pattern.split("."), topic.split(".")
    if p[-1] == "#":
        head = p[:-1]
        pairs = zip(head, t[: len(head)], strict=True)
        return len(t) >= len(head) and all(a in ("*", b) for a, b in pairs)
    return len(p) == len(t) and all(a in ("*", b) for a, b in zip(p, t, strict=True))


class BusMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.bus = Bus(shards=3, queue_size=4)
        self.loop.run_until_complete(self._start())
        self.subs: list[tuple[Any, str, list[tuple[str, int]]]] = []
        self.expected: dict[int, list[tuple[str, int]]] = {}
        self.counter = 0

    async def _start(self) -> None:
        self.bus.start()

    @rule(pattern=patterns)
    def subscribe(self, pattern: str) -> None:
        got: list[tuple[str, int]] = []

        async def handler(message: tuple[str, int]) -> None:
            got.append(message)

        sub = self.bus.subscribe(pattern, handler)
        self.subs.append((sub, pattern, got))
        self.expected[id(got)] = []

    @rule(data=st.data())
    def unsubscribe(self, data: st.DataObject) -> None:
        if not self.subs:
            return
        index = data.draw(st.integers(0, len(self.subs) - 1))
        sub, _pattern, got = self.subs.pop(index)
        self.loop.run_until_complete(self.bus.join())  # deliver what was queued
        self.bus.unsubscribe(sub)
        assert got == self.expected.pop(id(got))

    @rule(topic=topics, key=st.sampled_from(["a", "b", None]), n=st.integers(1, 3))
    def publish(self, topic: str, key: str | None, n: int) -> None:
        items = []
        for _ in range(n):
            self.counter += 1
            items.append((topic, (topic, self.counter)))
        self.loop.run_until_complete(self.bus.publish_many(items, key=key))
        # Only subscriptions present now will see it once delivered; deliver
        # before anything changes the subscriptions.
        self.loop.run_until_complete(self.bus.join())
        for _sub, pattern, got in self.subs:
            if naive_match(pattern, topic):
                self.expected[id(got)].extend(message for _t, message in items)

    @invariant()
    def delivered_exactly_as_the_model_says(self) -> None:
        for _sub, _pattern, got in self.subs:
            assert got == self.expected[id(got)]

    def teardown(self) -> None:
        self.loop.run_until_complete(self.bus.stop())
        self.loop.close()


TestBusModel = BusMachine.TestCase
TestBusModel.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
