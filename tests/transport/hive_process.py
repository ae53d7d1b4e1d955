"""Run one hive as its own process for the scale-out test.

Configured by IMMUNE_* variables; runs until SIGTERM, then prints its
counters as one JSON line on stdout.
"""

from __future__ import annotations

import asyncio
import json
import signal

from immune import config as config_mod
from immune.hive import Hive


async def main() -> None:
    hive = Hive(config_mod.load())
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await hive.start()
    print("started", flush=True)
    await stop.wait()
    await hive.stop()
    hive.store.close()
    print(json.dumps(hive.metrics.snapshot()), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
