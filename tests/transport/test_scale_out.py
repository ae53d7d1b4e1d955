"""Two hive processes on one MQTT 5 shared subscription, one PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from immune.events import Event, new_id, now_ns

from .conftest import agent_config, until

pytestmark = [pytest.mark.mqtt, pytest.mark.postgres]
HIVE = Path(__file__).with_name("hive_process.py")
MARKERS = sa.text(
    "SELECT count(*), count(DISTINCT data->'extra'->>'marker'),"
    " min((data->'extra'->>'marker')::int), max((data->'extra'->>'marker')::int)"
    " FROM events WHERE data->'extra' ? 'marker'"
)


def start_hive(pg_url: str, broker: str, prefix: str, name: str, tmp: Path):
    env = {
        **os.environ,
        "IMMUNE_HIVE__DATABASE": pg_url,
        "IMMUNE_HIVE__COMMAND_KEY": str(tmp / "command.key"),
        "IMMUNE_MQTT__URL": broker,
        "IMMUNE_MQTT__TOPIC_PREFIX": prefix,
        "IMMUNE_MQTT__SHARED_GROUP": "hives",
        "IMMUNE_MQTT__CLIENT_ID": f"immune-test-{name}",
        "IMMUNE_MQTT__PERSISTENT_SESSION": "false",
        "IMMUNE_PLUGINS__ALERT__CONSOLE": "false",
        "IMMUNE_PLUGINS__ALERT__FILE": str(tmp / f"{name}-alerts.log"),
    }
    env.pop("IMMUNE_CONFIG", None)
    with (tmp / f"{name}.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(HIVE)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "started", (
        tmp / f"{name}.log"
    ).read_text()
    return proc


def stop_hive(proc: subprocess.Popen[str]) -> dict[str, float]:
    proc.terminate()
    out, _ = proc.communicate(timeout=60)
    metrics: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return metrics


async def test_two_hives_share_the_stream_each_event_stored_once(
    tmp_path: Path, pg_url: str, mosquitto, agent_factory
) -> None:
    broker = mosquitto()
    prefix = "immune/v1"
    # The first hive migrates the database; the second finds it ready.
    hives = [start_hive(pg_url, broker.url, prefix, "hive-a", tmp_path)]
    hives.append(start_hive(pg_url, broker.url, prefix, "hive-b", tmp_path))
    engine = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        running = await agent_factory(
            agent_config(tmp_path, broker.url, prefix, batch_max_events=100)
        )
        agent = running.agent
        total = 20_000
        for n in range(total):
            agent.put(
                Event(
                    id=new_id(),
                    agent_id=agent.agent_id,
                    host=agent.host,
                    ts=now_ns(),
                    kind="exec",
                    pid=1,
                    sensor="test",
                    extra={"marker": n},
                )
            )
            if n % 1000 == 999:
                await asyncio.sleep(0.01)

        def stored() -> int:
            with engine.connect() as conn:
                return int(conn.execute(MARKERS).one()[0])

        await until(lambda: stored() >= total, timeout=120)
        await until(lambda: len(agent.spool) == 0, timeout=30)
        await running.stop()
    finally:
        metrics = [stop_hive(proc) for proc in hives]
    with engine.connect() as conn:
        count, distinct, low, high = conn.execute(MARKERS).one()
    engine.dispose()
    # Markers only: the /proc sensor may report a process of this machine.
    assert count == distinct == total and (low, high) == (0, total - 1)
    received = [m.get("events.received", 0) for m in metrics]
    assert all(r > 0 for r in received), f"one hive got nothing: {received}"
    assert sum(received) >= total + 2
