"""The agent's cost to the host: exec time with and without it, and its rate.

Overhead: the time of ``--execs`` runs of ``/bin/true`` one after the other
(``posix_spawn`` then ``waitpid``, from this process), first with no agent,
then with an ``immune agent`` process running the chosen sensors and sending
to the broker, then without again. The ratio is the median time with the
agent over the median time without.

Forwarding, two ways. Paced by the execs: the clock runs from the start of
the timed loop until the broker has delivered the last of its exec events
to a subscriber here. At capacity: a child process makes ``--connects``
UDP ``connect`` calls as fast as it can (no packet leaves; each is one
event), and the clock runs from its start to the last of those events
delivered; what the rate limit or a full queue dropped is read from the
agent's heartbeat.

    python benchmarks/agent_overhead.py [--execs 2000] [--connects 100000]
        [--sensors ebpf,fanotify]

Needs root for the kernel sensors and a broker on 127.0.0.1:1883 (else it
starts Mosquitto).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiomqtt
import orjson

from immune import broker
from immune.mqtt import parse_url

TRUE = "/bin/true"


def exec_loop(count: int, marker: str) -> float:
    """Seconds to spawn and reap ``count`` copies of /bin/true."""
    argv = [TRUE, marker]
    env: dict[str, str] = {}
    start = time.perf_counter()
    for _ in range(count):
        pid = os.posix_spawn(TRUE, argv, env)
        os.waitpid(pid, 0)
    return time.perf_counter() - start


def start_agent(
    url: str, prefix: str, sensors: list[str], log: Path
) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        IMMUNE_MQTT__URL=url,
        IMMUNE_MQTT__TOPIC_PREFIX=prefix,
        IMMUNE_AGENT__ID="bench-agent",
        IMMUNE_AGENT__SENSORS=json.dumps(sensors),
        IMMUNE_AGENT__HEARTBEAT_INTERVAL="1",
    )
    immune = Path(sys.executable).with_name("immune")
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(immune), "agent"], env=env, stdout=out, stderr=subprocess.STDOUT
        )


STORM = r"""
import socket, sys
count, port = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(count):
    s.connect(("127.0.0.1", port))
"""


def connect_storm(count: int, port: int) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", STORM, str(count), str(port)], check=True)
    return time.perf_counter() - start


class Counter:
    """Counts, from the broker, the exec events carrying a marker."""

    def __init__(self, url: str, prefix: str) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.host, self.port, self.prefix = host, int(port), prefix
        self.execs: dict[str, int] = {}
        self.kinds: dict[str, int] = {}
        self.last: dict[str, float] = {}
        self.storm_port = 0
        self.connects = 0
        self.last_connect = 0.0
        self.heartbeat: dict[str, object] | None = None
        self.online = asyncio.Event()

    async def run(self) -> None:
        async with aiomqtt.Client(self.host, self.port) as client:
            await client.subscribe(f"{self.prefix}/#", qos=1)
            async for message in client.messages:
                self.handle(str(message.topic), bytes(message.payload))

    def handle(self, topic: str, payload: bytes) -> None:
        if topic.endswith("/status"):
            self.online.set()
            return
        if topic.endswith("/heartbeat"):
            self.heartbeat = orjson.loads(payload)
            return
        if not topic.endswith("/events"):
            return
        for event in orjson.loads(payload)["events"]:
            self.kinds[event["kind"]] = self.kinds.get(event["kind"], 0) + 1
            if event["kind"] == "connect" and event.get("port") == self.storm_port:
                self.connects += 1
                self.last_connect = time.perf_counter()
            argv = event.get("argv") or []
            if event["kind"] == "exec" and len(argv) == 2:
                self.execs[argv[1]] = self.execs.get(argv[1], 0) + 1
                self.last[argv[1]] = time.perf_counter()


async def clear_status(counter: Counter, prefix: str) -> None:
    """Leave the shared broker as found: clear the agent's retained status."""
    async with aiomqtt.Client(counter.host, counter.port) as client:
        topic = f"{prefix}/agents/bench-agent/status"
        await client.publish(topic, b"", qos=1, retain=True)


async def storm_rate(args: argparse.Namespace, counter: Counter) -> dict[str, float]:
    """Events/s delivered while a child makes connect calls flat out."""
    counter.storm_port = port = 40000 + int(uuid.uuid4().int % 20000)
    start = time.perf_counter()
    produced = await asyncio.to_thread(connect_storm, args.connects, port)
    seen, deadline = -1, time.monotonic() + 60
    while counter.connects != seen and time.monotonic() < deadline:
        seen = counter.connects
        await asyncio.sleep(1.0)  # until nothing more arrives for a second
    span = counter.last_connect - start
    return {
        "storm_produced_per_s": args.connects / produced,
        "storm_received": counter.connects,
        "storm_per_s": counter.connects / span if span > 0 else 0.0,
    }


async def with_agent(args: argparse.Namespace, url: str) -> dict[str, float]:
    prefix = f"immune-bench/{uuid.uuid4().hex}"
    counter = Counter(url, prefix)
    listen = asyncio.create_task(counter.run())
    log = Path(tempfile.mkdtemp(prefix="immune-bench-")) / "agent.log"
    agent = start_agent(url, prefix, args.sensors.split(","), log)
    try:
        await asyncio.wait(
            {listen, asyncio.ensure_future(counter.online.wait())},
            timeout=60,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if listen.done():
            listen.result()  # the subscriber failed: say why
        await asyncio.sleep(1.0)  # let the start-up settle
        marker = f"m{uuid.uuid4().hex[:8]}"
        start = time.perf_counter()
        took = await asyncio.to_thread(exec_loop, args.execs, marker)
        deadline = time.monotonic() + 60
        while counter.execs.get(marker, 0) < args.execs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        got = counter.execs.get(marker, 0)
        span = counter.last.get(marker, time.perf_counter()) - start
        storm = await storm_rate(args, counter)
        await asyncio.sleep(1.5)  # one more heartbeat
    finally:
        agent.terminate()
        _, _, usage = await asyncio.to_thread(os.wait4, agent.pid, 0)
        agent.returncode = 0
        listen.cancel()
        await clear_status(counter, prefix)
    return {
        "seconds": took,
        "received": got,
        "events_per_s": got / span if span > 0 else 0.0,
        "all_kinds": sum(counter.kinds.values()),
        **storm,
        "agent_cpu_s": usage.ru_utime + usage.ru_stime,
        "agent_rss_mb": usage.ru_maxrss / 1024,
        "log": str(log),  # type: ignore[dict-item]
        "heartbeat": counter.heartbeat,  # type: ignore[dict-item]
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execs", type=int, default=2000)
    parser.add_argument("--connects", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sensors", default="ebpf,fanotify")
    args = parser.parse_args()

    return asyncio.run(measure(args))


async def measure(args: argparse.Namespace) -> int:
    url = "mqtt://127.0.0.1:1883"
    if broker.reachable(parse_url(url)):
        return await measure_with(args, url)
    async with broker.mosquitto() as started:
        return await measure_with(args, started)


async def measure_with(args: argparse.Namespace, url: str) -> int:
    exec_loop(200, "warm-up")
    # Pairs, each a run without the agent then one with it, so that the
    # load of other tenants weighs on both halves of a ratio alike.
    without: list[float] = []
    with_: list[dict[str, float]] = []
    for _ in range(args.runs):
        without.append(exec_loop(args.execs, "baseline"))
        with_.append(await with_agent(args, url))
    ratios = [r["seconds"] / b for r, b in zip(with_, without, strict=True)]

    base = statistics.median(without)
    timed = statistics.median(r["seconds"] for r in with_)
    rates = [r["events_per_s"] for r in with_]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(f"sensors: {args.sensors}; {args.execs} execs of {TRUE}, {args.runs} runs")
    print(f"without agent: {base:.3f} s  {[round(t, 3) for t in without]}")
    print(f"with agent:    {timed:.3f} s  {[round(r['seconds'], 3) for r in with_]}")
    print(f"ratio per pair: {[round(r, 2) for r in ratios]}")
    print(f"ratio:         {statistics.median(ratios):.2f} (median of the pairs)")
    print(f"fastest runs:  {min(r['seconds'] for r in with_) / min(without):.2f}")
    cpu = [round(r["agent_cpu_s"], 2) for r in with_]
    rss = [round(r["agent_rss_mb"]) for r in with_]
    print(f"agent CPU s per run (all phases): {cpu}, max RSS MB: {rss}")
    print(f"exec events received: {[int(r['received']) for r in with_]}")
    rounded = [round(r) for r in rates]
    print(f"events/s forwarded (execs): {statistics.median(rates):,.0f} {rounded}")
    print(f"all events received per run: {[int(r['all_kinds']) for r in with_]}")
    print(
        "connect storm: produced/s "
        f"{[round(r['storm_produced_per_s']) for r in with_]}, received "
        f"{[int(r['storm_received']) for r in with_]} of {args.connects}, "
        f"delivered/s {[round(r['storm_per_s']) for r in with_]}"
    )
    print(f"last heartbeat counters: {with_[-1]['heartbeat']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
