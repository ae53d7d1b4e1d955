"""Tasks plugins start through the hive: forgotten once they end, and their sleeps."""

from __future__ import annotations

import asyncio

from immune import config as config_mod
from immune.hive import Hive


async def test_hive_forgets_finished_tasks(sqlite_url: str) -> None:
    config = config_mod.load(environ={})
    config.hive.database = sqlite_url
    hive = Hive(config, discover=False)
    async with hive:
        done = [hive.create_task(asyncio.sleep(0), name=f"t{n}") for n in range(100)]
        waiting = hive.create_task(hive.stopping.wait(), name="until-stop")
        await asyncio.gather(*done)
        await asyncio.sleep(0)
        assert hive._tasks == [waiting]
    assert waiting.done() and hive._tasks == []
    hive.store.close()


async def test_hive_sleep_runs_out_or_ends_with_the_hive(sqlite_url: str) -> None:
    config = config_mod.load(environ={})
    config.hive.database = sqlite_url
    hive = Hive(config, discover=False)
    assert await hive.sleep(0.01) is True
    ticks = 0

    async def periodic() -> None:
        nonlocal ticks
        while await hive.sleep(0.01):
            ticks += 1

    task = asyncio.create_task(periodic())
    await asyncio.sleep(0.1)
    hive.stopping.set()
    await asyncio.wait_for(task, 1)  # ends at once, not after another tick
    assert ticks >= 1
    assert await hive.sleep(60) is False
    hive.store.close()
