"""Events per second through the detection set, and event-to-alert latency.

Three measurements on one stream of generated host events (a realistic mix
of kinds, about 1 % of them malicious so that rules and correlations fire):

1. the engine alone: every event matched against the rules (indexed by
   kind) and fed to the correlations, then also evaluated by the Sigma
   engine on the SigmaHQ Linux rules, in one process, no bus;
2. the hive: the same events through a real :class:`immune.hive.Hive` bus,
   with the full detection set subscribed (the ``rules``, ``correlate``,
   ``exploit`` and ``sigma`` plugins; storage in a temporary SQLite file, as
   always in a hive), and without them; the clock
   runs from the first ``ingest`` until the bus has handled every event and
   alert (storage buffers on the bus and writes in its own thread, which may
   still be writing then);
3. latency from ``ingest`` of a malicious event to its alert (or the update
   of the alert it folded into) reaching a bus subscriber, with the hive
   idle and with it under the load of (2).

    python benchmarks/detection.py [--events 200000] [--rules DIR ...]
        [--corpus DIR | --no-sigma]

``--rules`` adds rule files or directories (IMMUNE's YAML rule language) to
the shipped ones, to measure a larger detection set. The Sigma corpus is
``--corpus``, else ``IMMUNE_SIGMA_CORPUS``, else ``../shared/data/sigma-linux``
beside the repository; ``--no-sigma`` leaves Sigma out.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
from sigma_corpus import find_corpus  # this folder: the scripts run from it

from immune import config as config_mod
from immune.events import Alert, Event, now_ns
from immune.hive import Hive
from immune.plugins.correlate import CorrelatePlugin
from immune.plugins.exploit import ExploitPlugin
from immune.plugins.rules import RulesPlugin
from immune.plugins.sigma import SigmaPlugin
from immune.rules import Correlator, load_rules
from immune.sigma import SigmaEngine
from immune.sigma import load_rules as load_sigma

REPO = Path(__file__).resolve().parent.parent

AGENTS = [f"host-{n:03d}" for n in range(50)]
BENIGN_EXES = ["/usr/bin/ls", "/usr/bin/python3.11", "/usr/bin/git", "/bin/bash"]


def benign(rng: random.Random, n: int, ts: int) -> Event:
    agent = rng.choice(AGENTS)
    base: dict[str, Any] = {
        "id": f"b{n}",
        "agent_id": agent,
        "host": f"{agent}.example.org",
        "ts": ts,
        "pid": 10_000 + n % 50_000,
        "uid": 1000,
        "euid": 1000,
    }
    roll = rng.random()
    if roll < 0.6:
        exe = rng.choice(BENIGN_EXES)
        argv = [exe.rsplit("/", 1)[1], "-c", f"echo {n}", "--flag", str(n % 97)]
        return Event(kind="exec", exe=exe, argv=argv, cwd="/home/u/src", **base)
    if roll < 0.75:
        addr = f"198.51.100.{n % 200}"
        return Event(kind="connect", addr=addr, port=443, family="inet", **base)
    if roll < 0.85:
        return Event(
            kind="open", path=f"/home/u/src/f{n % 300}.py", exe="/bin/cat", **base
        )
    if roll < 0.95:
        return Event(kind="fork", ppid=1000, **base)
    return Event(kind="exit", exit_code=0, **base)


def malicious(rng: random.Random, n: int, ts: int) -> Event:
    agent = rng.choice(AGENTS)
    base: dict[str, Any] = {
        "id": f"m{n}",
        "agent_id": agent,
        "host": f"{agent}.example.org",
        "ts": ts,
        "pid": 77,
        "uid": 1000,
        "euid": 1000,
    }
    kind = rng.choice(["exec", "connect", "setuid", "open"])
    if kind == "exec":
        return Event(kind="exec", exe="/tmp/.x/i", argv=["/tmp/.x/i"], **base)
    if kind == "connect":
        return Event(kind="connect", addr="203.0.113.66", port=4444, **base)
    if kind == "setuid":
        base.update(euid=0, old_euid=1000)
        return Event(kind="setuid", exe="/tmp/.x/i", **base)
    return Event(kind="open", path="/etc/shadow", exe="/tmp/.x/i", **base)


def make_stream(n: int, seed: int = 1) -> list[Event]:
    rng = random.Random(seed)
    start = now_ns()
    # 30,000 events/s of simulated time, so windows hold realistic counts.
    return [
        (malicious if rng.random() < 0.01 else benign)(rng, i, start + i * 33_333)
        for i in range(n)
    ]


def corpus_dir(given: str | None) -> Path:
    found = find_corpus(given)
    if found is None:
        msg = "Sigma corpus not found: pass --corpus or --no-sigma, or set"
        msg += " IMMUNE_SIGMA_CORPUS"
        raise SystemExit(msg)
    return found


def engine_rate(
    events: list[Event], paths: list[str], corpus: Path | None
) -> dict[str, Any]:
    ruleset = load_rules(paths, defaults=True)
    start = time.perf_counter()
    hits = sum(len(ruleset.match(e)) for e in events)
    rules_only = len(events) / (time.perf_counter() - start)

    correlator = Correlator(ruleset.correlations)
    start = time.perf_counter()
    for event in events:
        ruleset.match(event)
        correlator.feed(event)
    both = len(events) / (time.perf_counter() - start)
    result: dict[str, Any] = {
        "rules": len(ruleset.rules),
        "correlations": len(ruleset.correlations),
        "rules_only": rules_only,
        "rules_and_correlations": both,
        "hits": hits,
    }
    if corpus is None:
        return result
    sigma_rules = load_sigma([corpus])
    sigma = SigmaEngine(sigma_rules)
    correlator = Correlator(ruleset.correlations)
    sigma_hits = 0
    start = time.perf_counter()
    for event in events:
        ruleset.match(event)
        correlator.feed(event)
        sigma_hits += len(sigma.evaluate(event).matched)
    result.update(
        sigma_rules=len(sigma_rules.rules),
        sigma_hits=sigma_hits,
        full=len(events) / (time.perf_counter() - start),
    )
    return result


def make_hive(
    directory: Path, paths: list[str], corpus: Path | None, detect: bool = True
) -> Hive:
    config = config_mod.load(environ={})
    config.hive.database = f"sqlite:///{directory / 'bench.db'}"
    config.plugins["rules"] = {"paths": paths, "poll_interval": 0}
    config.plugins["correlate"] = {"paths": paths, "poll_interval": 0}
    plugins: list[tuple[str, Any]] = [
        ("rules", RulesPlugin()),
        ("correlate", CorrelatePlugin()),
        ("exploit", ExploitPlugin()),
    ]
    if corpus is not None:
        config.plugins["sigma"] = {"rule_dirs": [str(corpus)]}
        plugins.append(("sigma", SigmaPlugin()))
    return Hive(config, plugins=plugins if detect else [], discover=False)


async def baseline_rate(events: list[Event]) -> float:
    """Events/s through the same hive (bus and storage) with no detection."""
    with tempfile.TemporaryDirectory() as tmp:
        hive = make_hive(Path(tmp), [], None, detect=False)
        await hive.start()
        try:
            start = time.perf_counter()
            for offset in range(0, len(events), 500):
                await hive.ingest(events[offset : offset + 500])
            await settle(hive)
            elapsed = time.perf_counter() - start
        finally:
            await hive.stop()
            hive.store.close()
    return len(events) / elapsed


class Latency:
    """Times from ingest of a marked event to the first alert naming it."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}
        self.samples: list[float] = []

    def on_alert(self, alert: Alert) -> None:
        for event_id in alert.event_ids:
            sent = self.sent.pop(event_id, None)
            if sent is not None:
                self.samples.append(time.perf_counter() - sent)


async def settle(hive: Hive) -> None:
    for _ in range(4):
        await hive.bus.join()


async def hive_run(
    events: list[Event],
    paths: list[str],
    corpus: Path | None,
    idle_samples: int,
    load_rate: int,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        hive = make_hive(Path(tmp), paths, corpus)
        latency = Latency()
        alerts = [0]

        def count(_alert: Alert) -> None:
            alerts[0] += 1

        hive.bus.subscribe("alert.#", latency.on_alert, owner="bench")
        # A repeat folded into an open alert reaches subscribers as an update.
        hive.bus.subscribe("alert_update.#", latency.on_alert, owner="bench")
        hive.bus.subscribe("alert.#", count, owner="bench-count")
        await hive.start()
        try:
            idle = await idle_latency(hive, latency, idle_samples)
            latency.samples.clear()
            start = time.perf_counter()
            for offset in range(0, len(events), 500):
                await hive.ingest(events[offset : offset + 500])
            await settle(hive)
            elapsed = time.perf_counter() - start
            raised = alerts[0]
            latency.sent.clear()
            loaded = await paced_latency(hive, latency, events, load_rate)
        finally:
            await hive.stop()
            hive.store.close()
    return {
        "rate": len(events) / elapsed,
        "alerts": raised,
        "idle": idle,
        "loaded": loaded,
    }


async def idle_latency(hive: Hive, latency: Latency, samples: int) -> list[float]:
    rng = random.Random(7)
    for n in range(samples):
        event = malicious(rng, 10_000_000 + n, now_ns())
        latency.sent[event.id] = time.perf_counter()
        await hive.ingest([event])
        await settle(hive)
    return list(latency.samples)


async def paced_latency(
    hive: Hive, latency: Latency, events: list[Event], rate: int
) -> list[float]:
    """Latency of the malicious events while ingesting at ``rate`` events/s,
    in batches of 100 (the events get new ids, so their alerts are new)."""
    latency.samples.clear()
    loop = asyncio.get_running_loop()
    begin = loop.time()
    for n, offset in enumerate(range(0, len(events), 100)):
        batch = [
            msgspec.structs.replace(e, id=f"p{e.id}", ts=now_ns())
            for e in events[offset : offset + 100]
        ]
        due = begin + n * 100 / rate
        await asyncio.sleep(max(0.0, due - loop.time()))
        for event in batch:
            if event.id.startswith("pm"):
                latency.sent[event.id] = time.perf_counter()
        await hive.ingest(batch)
    await settle(hive)
    return list(latency.samples)


def quantiles(samples: list[float]) -> str:
    if len(samples) < 2:
        return "n/a"
    # "inclusive": with few samples the default extrapolates past the largest.
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return (
        f"p50 {cuts[49] * 1e3:.2f} ms, p99 {cuts[98] * 1e3:.2f} ms, "
        f"max {max(samples) * 1e3:.2f} ms ({len(samples)} samples)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument(
        "--rules", action="append", default=[], help="extra rule files or dirs"
    )
    parser.add_argument("--idle-samples", type=int, default=300)
    parser.add_argument(
        "--load-rate", type=int, default=10_000, help="events/s for latency under load"
    )
    parser.add_argument("--corpus", help="the SigmaHQ Linux rules")
    parser.add_argument("--no-sigma", action="store_true", help="leave Sigma out")
    args = parser.parse_args()
    corpus = None if args.no_sigma else corpus_dir(args.corpus)
    # Rules of the corpus IMMUNE cannot evaluate are reported by the loader;
    # sigma.md lists them, the benchmark need not.
    for name in ("immune.sigma", "immune.plugins.sigma"):
        logging.getLogger(name).setLevel(logging.ERROR)

    events = make_stream(args.events)
    python = platform.python_version()
    print(f"python {python} on {platform.machine()}, {len(events):,} events")
    engine = engine_rate(events, args.rules, corpus)
    print(
        f"detection set: {engine['rules']} rules, {engine['correlations']} "
        f"correlations; {engine['hits']:,} rule matches"
    )
    if corpus is not None:
        print(
            f"sigma: {engine['sigma_rules']} rules of {corpus}; "
            f"{engine['sigma_hits']:,} matches"
        )
    print(f"engine, rules only:              {engine['rules_only']:>10,.0f} events/s")
    both = engine["rules_and_correlations"]
    print(f"engine, rules and correlations:  {both:>10,.0f} events/s")
    if corpus is not None:
        full = engine["full"]
        print(f"engine, rules, corr. and sigma:  {full:>10,.0f} events/s")
    baseline = await baseline_rate(events)
    print(f"hive bus, no detection:          {baseline:>10,.0f} events/s")
    result = await hive_run(
        events, args.rules, corpus, args.idle_samples, args.load_rate
    )
    plugins = "rules, correlate, exploit" + (", sigma" if corpus else "")
    print(
        f"hive bus, {plugins}: {result['rate']:>10,.0f} events/s "
        f"({result['alerts']:,} alerts)"
    )
    cost = 1e6 / result["rate"] - 1e6 / baseline
    print(f"detection cost in the hive:      {cost:>10.1f} µs/event")
    print(f"latency, idle hive:    {quantiles(result['idle'])}")
    print(f"latency at {args.load_rate:,} events/s: {quantiles(result['loaded'])}")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
