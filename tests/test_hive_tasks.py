"""Tasks plugins start through the hive are forgotten once they end."""

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
