"""Running the long-lived processes: the hive, the agent, and both at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator

from rich.console import Console
from rich.live import Live
from rich.table import Table

from immune import broker
from immune.agent import Agent
from immune.config import Config
from immune.hive import Hive
from immune.metrics import Metrics
from immune.mqtt import parse_url

logger = logging.getLogger(__name__)

STATUS_EVERY = 1.0
#: Seconds between two status lines in the log of ``immune hive``.
STATUS_LOG_EVERY = 60.0


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


@contextlib.asynccontextmanager
async def _broker_for(config: Config) -> AsyncIterator[str]:
    """The configured broker if it answers, else an embedded one."""
    address = parse_url(config.mqtt.url)
    if await asyncio.to_thread(broker.reachable, address):
        logger.info("Using the MQTT broker at %s.", address)
        yield config.mqtt.url
        return
    logger.info("No MQTT broker answers at %s; starting one.", address)
    async with broker.embedded() as url:
        yield url


async def run_hive(
    config: Config,
    stop: asyncio.Event | None = None,
    status_every: float = STATUS_LOG_EVERY,
) -> None:
    """Run the hive until SIGINT/SIGTERM (or ``stop``), logging its status."""
    stop = stop or asyncio.Event()
    _stop_on_signals(stop)
    async with Hive(config) as hive:
        rate = _Rate()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), status_every)
            if not stop.is_set():
                logger.info("%s", status_line(hive, hive.metrics.snapshot(), rate))


async def run_agent(config: Config, stop: asyncio.Event | None = None) -> None:
    """Run the agent until SIGINT/SIGTERM (or ``stop``)."""
    stop = stop or asyncio.Event()
    _stop_on_signals(stop)
    await Agent(config).run(stop)


def _share_command_key(config: Config) -> None:
    """Give the local agent the hive's public command key, unless configured."""
    from immune import signing
    from immune.config import state_dir

    if config.agent.command_public_key:
        return
    key = signing.load_or_create_key(
        config.hive.command_key or state_dir() / "command.key"
    )
    public = state_dir() / "command.pub"
    public.write_bytes(signing.public_pem(key))
    config.agent.command_public_key = str(public)


async def run_up(
    config: Config, console: Console, stop: asyncio.Event | None = None
) -> None:
    """The main job: broker if needed, hive and local agent, live status."""
    stop = stop or asyncio.Event()
    _stop_on_signals(stop)
    async with _broker_for(config) as url:
        config.mqtt.url = url
        metrics = Metrics()
        hive = Hive(config, metrics=metrics)
        await hive.start()
        _share_command_key(config)
        agent = Agent(config, metrics=metrics)
        agent_stop = asyncio.Event()
        agent_task = asyncio.create_task(agent.run(agent_stop), name="immune-agent")
        console.print(
            f"[bold green]IMMUNE is up[/]: broker {url}, database "
            f"{config.hive.database}. Ctrl-C to stop."
        )
        try:
            await _show_status(hive, console, stop, agent_task)
        finally:
            agent_stop.set()
            await asyncio.gather(agent_task, return_exceptions=True)
            await hive.stop()


async def _show_status(
    hive: Hive, console: Console, stop: asyncio.Event, agent_task: asyncio.Task[None]
) -> None:
    rate = _Rate()
    waiter = asyncio.create_task(stop.wait())
    live = Live(console=console, auto_refresh=False, transient=True)
    with live if console.is_terminal else contextlib.nullcontext():
        while not stop.is_set():
            await asyncio.wait({waiter, agent_task}, timeout=STATUS_EVERY)
            if agent_task.done():
                exc = agent_task.exception()
                if exc is not None:
                    raise exc
                break
            snapshot = hive.metrics.snapshot()
            table = status_table(hive, snapshot, rate.update(snapshot))
            if console.is_terminal:
                live.update(table, refresh=True)
    waiter.cancel()


class _Rate:
    def __init__(self) -> None:
        self.last = (time.monotonic(), 0.0)

    def update(self, snapshot: dict[str, float]) -> float:
        now, total = time.monotonic(), snapshot.get("events.accepted", 0)
        then, before = self.last
        self.last = (now, total)
        return (total - before) / max(now - then, 1e-6)


def status_line(hive: Hive, m: dict[str, float], rate: _Rate) -> str:
    """The status of ``immune hive``, one log line (``up`` shows a table)."""
    per_second = rate.update(m)
    return (
        f"Status: {hive.agents_online()} agents online, "
        f"{int(m.get('events.accepted', 0)):,} events ({per_second:,.0f}/s), "
        f"{int(m.get('alerts.raised', 0)):,} alerts, "
        f"{int(m.get('deadletters', 0)):,} dead letters, "
        f"{int(m.get('agent.dropped', 0)):,} dropped by agents, "
        f"{int(m.get('storage.pending', 0)):,} rows waiting for the database."
    )


def status_table(hive: Hive, m: dict[str, float], rate: float) -> Table:
    """The one-line live status of ``immune up``."""
    table = Table(box=None, show_header=True, header_style="bold")
    for column in (
        "agents",
        "events",
        "events/s",
        "alerts",
        "dead letters",
        "dropped",
        "db pending",
    ):
        table.add_column(column, justify="right")
    table.add_row(
        str(hive.agents_online()),
        f"{int(m.get('events.accepted', 0)):,}",
        f"{rate:,.0f}",
        f"{int(m.get('alerts.raised', 0)):,}",
        f"{int(m.get('deadletters', 0)):,}",
        f"{int(m.get('agent.dropped', 0)):,}",
        f"{int(m.get('storage.pending', 0)):,}",
    )
    return table
