"""End-to-end transport: agent to stored, over plain TCP and over mutual TLS.

An agent (this process) spools events and publishes them through a private
Mosquitto to a hive (``immune hive``, its own process) that stores them in
SQLite and sends receipts. Two figures per transport:

- throughput: events put into the agent as fast as it takes them, from the
  first put to the receipt of the last (a receipt means stored);
- latency: events put at a steady rate; for each, the time from its put to
  the agent's receipt for it, i.e. publish to stored, p50 and p99.

    python benchmarks/transport_e2e.py [--events 100000] [--rate 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from immune import config as config_mod
from immune import pki
from immune.agent import Agent
from immune.broker import free_port
from immune.events import Event, new_id, now_ns


def mosquitto_conf(directory: Path, plain: int, tls: int) -> Path:
    conf = directory / "mosquitto.conf"
    user = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(
        "per_listener_settings true\n"
        f"listener {plain} 127.0.0.1\nallow_anonymous true\n"
        f"listener {tls} 127.0.0.1\nallow_anonymous true\n"
        f"cafile {directory}/ca.pem\ncertfile {directory}/broker.pem\n"
        f"keyfile {directory}/broker.key\nrequire_certificate true\n"
        "use_identity_as_username true\n"
        f"max_queued_messages 0\npersistence false\n{user}",
        encoding="utf-8",
    )
    return conf


def hive_env(directory: Path, url: str, tls: bool) -> dict[str, str]:
    env = {
        **os.environ,
        "IMMUNE_HIVE__DATABASE": f"sqlite:///{directory}/hive-{tls}.db",
        "IMMUNE_HIVE__COMMAND_KEY": str(directory / "command.key"),
        "IMMUNE_HIVE__AGENT_RATE_LIMIT": "100000",
        "IMMUNE_MQTT__URL": url,
        "IMMUNE_MQTT__PERSISTENT_SESSION": "false",
        "IMMUNE_PLUGINS__ALERT__CONSOLE": "false",
        "IMMUNE_PLUGINS__ALERT__FILE": str(directory / "alerts.log"),
    }
    if tls:
        env |= {
            "IMMUNE_MQTT__CA_FILE": str(directory / "ca.pem"),
            "IMMUNE_MQTT__CERT_FILE": str(directory / "hive.pem"),
            "IMMUNE_MQTT__KEY_FILE": str(directory / "hive.key"),
        }
    return env


def agent_config(directory: Path, url: str, tls: bool, name: str) -> config_mod.Config:
    config = config_mod.load(environ={})
    config.mqtt.url = url
    config.agent.id = name
    config.agent.sensors = ["proc"]
    config.agent.proc_poll_interval = 3600.0
    config.agent.batch_max_delay = 0.005
    config.agent.spool = str(directory / f"{name}.spool")
    if tls:
        config.mqtt.ca_file = str(directory / "ca.pem")
        config.mqtt.cert_file = str(directory / f"agent-{name}.pem")
        config.mqtt.key_file = str(directory / f"agent-{name}.key")
    return config


class Probe:
    """Records when each spooled event's receipt came back."""

    def __init__(self, agent: Agent) -> None:
        self.receipted: list[tuple[int, int, float]] = []
        original = agent._receipt

        def receipt(payload: bytes) -> None:
            import orjson

            first, last = orjson.loads(payload)["seq"]
            self.receipted.append((first, last, time.monotonic()))
            original(payload)

        agent._receipt = receipt  # type: ignore[method-assign]

    def last_seq(self) -> int:
        return max((last for _, last, _ in self.receipted), default=0)

    def times(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for first, last, at in self.receipted:
            for seq in range(first, last + 1):
                out.setdefault(seq, at)
        return out


def event(agent: Agent, n: int) -> Event:
    return Event(
        id=new_id(),
        agent_id=agent.agent_id,
        host=agent.host,
        ts=now_ns(),
        kind="exec",
        pid=1000 + n % 30000,
        ppid=1,
        uid=1000,
        comm="bench",
        exe="/usr/bin/bench",
        argv=["/usr/bin/bench", "--n", str(n)],
        sensor="bench",
    )


async def run_agent(
    config: config_mod.Config, events: int, rate: int
) -> dict[str, float]:
    stop = asyncio.Event()
    agent = Agent(config)
    probe = Probe(agent)
    task = asyncio.create_task(agent.run(stop))
    await asyncio.wait_for(agent.connected.wait(), 30)
    await asyncio.sleep(0.5)
    base = probe.last_seq()  # agent_start

    # Throughput: as fast as the agent takes them.
    start = time.monotonic()
    for n in range(events):
        agent.put(event(agent, n))
        if n % 2000 == 1999:
            await asyncio.sleep(0)
    while probe.last_seq() < base + events or len(agent.spool or ()):
        await asyncio.sleep(0.005)
    throughput = events / (time.monotonic() - start)

    # Latency: a steady rate, each event's put to its receipt.
    base = probe.last_seq()
    puts: list[float] = []
    count = rate * 5
    tick = 0.01
    per_tick = max(1, int(rate * tick))
    while len(puts) < count:
        for _ in range(per_tick):
            puts.append(time.monotonic())
            agent.put(event(agent, len(puts)))
        await asyncio.sleep(tick)
    while probe.last_seq() < base + count:
        await asyncio.sleep(0.005)
    times = probe.times()
    latencies = sorted(times[base + 1 + i] - at for i, at in enumerate(puts))
    stop.set()
    await task
    q = statistics.quantiles(latencies, n=100)
    return {"events_per_s": throughput, "p50_ms": q[49] * 1e3, "p99_ms": q[98] * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=2000, help="events/s for latency")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="immune-bench-") as tmp:
        directory = Path(tmp)
        pki.create_ca(directory)
        pki.issue(directory, "127.0.0.1", server_names=["127.0.0.1"], basename="broker")
        pki.issue(directory, pki.HIVE_NAME, basename="hive")
        plain, tls = free_port(), free_port()
        broker = subprocess.Popen(
            ["mosquitto", "-c", str(mosquitto_conf(directory, plain, tls))],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        try:
            for name, url, secure in (
                ("tcp", f"mqtt://127.0.0.1:{plain}", False),
                ("mtls", f"mqtts://127.0.0.1:{tls}", True),
            ):
                pki.issue_agent(directory, f"bench-{name}")
                hive = subprocess.Popen(
                    [sys.executable, "-m", "immune", "hive"],
                    env=hive_env(directory, url, secure),
                    cwd=tmp,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(3)
                try:
                    config = agent_config(directory, url, secure, f"bench-{name}")
                    result = asyncio.run(run_agent(config, args.events, args.rate))
                finally:
                    hive.terminate()
                    hive.wait(60)
                print(
                    f"{name:5} {result['events_per_s']:9,.0f} events/s   latency "
                    f"p50 {result['p50_ms']:6.1f} ms  p99 {result['p99_ms']:6.1f} ms",
                    flush=True,
                )
        finally:
            broker.terminate()
            broker.wait(10)


if __name__ == "__main__":
    main()
