"""Events per second through the whole hive, beside a raw SQLite insert.

The hive path measured: a publisher process sends batches of events to a real
MQTT broker (QoS 1); the hive receives them (aiomqtt), decodes and validates
them, dispatches them on the bus to every installed plugin, and stores them
in SQLite through its batched writer. The clock runs from the first publish
until the last event is committed.

The baseline, in the same run on the same machine: ``sqlite3`` ``executemany``
of the very same rows into the same table (same schema, same indexes), in
transactions of 1000 rows, with the rows built beforehand.

    python benchmarks/hive_throughput.py [--events 200000] [--batch 500] [--runs 3]

Each run measures the raw insert, then the hive; the ratio is taken within a
run, and the median over the runs is printed last.

It uses the broker on 127.0.0.1:1883 when one answers, else starts Mosquitto.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

from immune import broker
from immune import config as config_mod
from immune.events import Event, encode, new_id, now_ns
from immune.hive import Hive
from immune.mqtt import parse_url
from immune.storage import Store
from immune.storage.writer import event_rows

PUBLISHER = r"""
import sys, paho.mqtt.client as mqtt
host, port, topic, path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
payloads = open(path, "rb").read().split(b"\n\x00\n")
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
client.max_inflight_messages_set(100)
client.connect(host, port)
client.loop_start()
# Started and connected: publish when told, so that the clock leaves out
# this interpreter's start.
print("ready", flush=True)
sys.stdin.readline()
infos = [client.publish(topic, p, qos=1) for p in payloads]
for info in infos:
    info.wait_for_publish()
client.loop_stop()
client.disconnect()
"""


def make_events(n: int, agent: str) -> list[Event]:
    """Exec events of the usual size (about 430 bytes of JSON each)."""
    now = now_ns()
    return [
        Event(
            id=new_id(),
            agent_id=agent,
            host="bench-host.example.org",
            ts=now + i,
            kind="exec",
            pid=10_000 + i % 50_000,
            ppid=1_000 + i % 977,
            uid=1000,
            euid=1000,
            comm="python3",
            exe="/usr/bin/python3.11",
            argv=["python3", "-m", "http.server", "--bind", "127.0.0.1", str(i % 9000)],
            cwd="/home/bench/project",
            sensor="bench",
        )
        for i in range(n)
    ]


def raw_sqlite_rate(events: list[Event], directory: Path) -> float:
    """Rows/s of sqlite3.executemany of the same rows into the same table."""
    url = f"sqlite:///{directory}/raw.db"
    store = Store(url)
    store.upgrade()
    store.close()
    received = now_ns()
    rows = event_rows((received, e) for e in events)
    columns = 21
    sql = f"INSERT INTO events VALUES ({', '.join('?' * columns)})"
    db = sqlite3.connect(directory / "raw.db")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    start = time.perf_counter()
    for i in range(0, len(rows), 1000):
        with db:
            db.executemany(sql, rows[i : i + 1000])
    elapsed = time.perf_counter() - start
    (count,) = db.execute("SELECT count(*) FROM events").fetchone()
    db.close()
    assert count == len(rows), (count, len(rows))
    return len(rows) / elapsed


async def hive_rate(
    events: list[Event], batch: int, url: str, directory: Path, args: argparse.Namespace
) -> dict:
    config = config_mod.load(environ={})
    config.storage.writer = args.writer
    config.hive.disabled_plugins = [p for p in args.disable.split(",") if p]
    if args.storage_batch:
        config.storage.batch_size = args.storage_batch
    prefix = f"immune-bench/{uuid.uuid4().hex[:8]}"
    config.hive.database = f"sqlite:///{directory}/hive.db"
    config.mqtt.url = url
    config.mqtt.topic_prefix = prefix
    config.mqtt.persistent_session = False
    config.mqtt.client_id = f"immune-bench-{uuid.uuid4().hex[:8]}"
    config.plugins["alert"] = {"console": False, "file": ""}

    agent = events[0].agent_id
    payloads = [
        encode({"v": 1, "agent_id": agent, "events": events[i : i + batch]})
        for i in range(0, len(events), batch)
    ]
    blob = directory / "payloads.bin"
    blob.write_bytes(b"\n\x00\n".join(payloads))

    hive = Hive(config)
    await hive.start()
    network = next(p.obj for p in hive.plugins.list() if p.name == "network")
    await asyncio.wait_for(network.connected.wait(), 10)
    plugins = [p.name for p in hive.plugins.list() if p.state == "running"]

    address = parse_url(url)
    topic = f"{prefix}/agents/{agent}/events"
    publisher = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PUBLISHER,
        address.host,
        str(address.port),
        topic,
        str(blob),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert publisher.stdin is not None and publisher.stdout is not None
    if await asyncio.wait_for(publisher.stdout.readline(), 30) != b"ready\n":
        raise RuntimeError("publisher failed to connect")
    cpu = CpuTimes()
    start = time.perf_counter()
    publisher.stdin.write(b"go\n")
    while hive.metrics.get("storage.events_written") < len(events):
        await asyncio.sleep(0.01)
        if publisher.returncode not in (None, 0):
            raise RuntimeError("publisher failed")
    elapsed = time.perf_counter() - start
    used = cpu.used()
    await publisher.wait()
    snapshot = hive.metrics.snapshot()
    await hive.stop()
    return {
        "rate": len(events) / elapsed,
        "plugins": plugins,
        "messages": len(payloads),
        "rejected": snapshot.get("events.rejected", 0),
        "handler_errors": snapshot.get("bus.handler_errors", 0),
        "cpu": used,
        "elapsed": elapsed,
    }


class CpuTimes:
    """CPU seconds the hive, its children and a local Mosquitto use from now."""

    def __init__(self) -> None:
        me = psutil.Process()
        self.processes = {"hive": me}
        for child in me.children(recursive=True):
            self.processes[f"child {child.pid}"] = child
        for proc in psutil.process_iter(["name"]):
            if proc.info["name"] == "mosquitto":
                self.processes[f"mosquitto {proc.pid}"] = proc
        self.start = {name: self._cpu(p) for name, p in self.processes.items()}

    @staticmethod
    def _cpu(proc: psutil.Process) -> float:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            return 0.0
        return times.user + times.system

    def used(self) -> dict[str, float]:
        # The publisher started after us: count its CPU as it is now.
        for child in psutil.Process().children(recursive=True):
            name = f"child {child.pid}"
            if name not in self.processes:
                self.processes[name] = child
                self.start[name] = 0.0
        return {
            name: self._cpu(p) - self.start[name] for name, p in self.processes.items()
        }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=500, help="events per message")
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    parser.add_argument(
        "--writer",
        choices=["process", "thread"],
        default="process",
        help="where the hive writes event rows (storage.writer)",
    )
    parser.add_argument(
        "--storage-batch",
        type=int,
        default=None,
        help="rows per transaction (storage.batch_size)",
    )
    parser.add_argument(
        "--disable", default="", help="plugins to leave out, comma-separated"
    )
    parser.add_argument("--runs", type=int, default=3, help="raw and hive, N times")
    args = parser.parse_args()

    events = make_events(args.events, agent="bench-agent")
    # The fixture stays in memory for the whole run, in the hive's process:
    # its hundreds of thousands of argv lists would make each full garbage
    # collection there walk them, a cost of this script, not of a hive.
    gc.freeze()
    size = len(encode(events[0]))
    print(
        f"machine: {platform.node()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, SQLite {sqlite3.sqlite_version}"
    )
    print(
        f"events: {args.events:,} of about {size} bytes, {args.batch} per message "
        f"(QoS 1); {args.runs} runs, each the raw insert then the hive"
    )
    ratios = []
    for run in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory(prefix="immune-bench-") as tmp:
            directory = Path(tmp)
            raw = raw_sqlite_rate(events, directory)
            if broker.reachable(parse_url(args.broker)):
                hive = await hive_rate(events, args.batch, args.broker, directory, args)
            else:
                async with broker.mosquitto() as url:
                    hive = await hive_rate(events, args.batch, url, directory, args)
        if run == 1:
            print(f"plugins on the bus: {', '.join(hive['plugins'])}")
        ratios.append(hive["rate"] / raw)
        busy = ", ".join(
            f"{name} {seconds / hive['elapsed']:.0%}"
            for name, seconds in hive["cpu"].items()
            if seconds > 0.01
        )
        print(
            f"run {run}: raw sqlite3 executemany {raw:,.0f} rows/s; hive, MQTT to "
            f"stored {hive['rate']:,.0f} events/s ({ratios[-1]:.0%} of raw); "
            f"CPU busy (of one core): {busy}"
        )
        if hive["rejected"] or hive["handler_errors"]:
            print(
                f"WARNING: {hive['rejected']} rejected, {hive['handler_errors']} errors"
            )
    print(
        f"hive / raw: median {statistics.median(ratios):.0%} "
        f"(range {min(ratios):.0%} to {max(ratios):.0%}, {len(ratios)} runs)"
    )


if __name__ == "__main__":
    asyncio.run(main())
