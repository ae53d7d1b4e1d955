"""Fixtures of the transport tests: hives, agents and Mosquitto instances.

``mosquitto`` starts a private Mosquitto on a free port with a config the
test writes (plain, TLS, mutual TLS with an ACL), which the test may stop
and start again; ``hive_factory`` and ``agent_factory`` run a hive and an
agent in this process on a broker and topic prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from immune import config as config_mod
from immune.agent import Agent
from immune.config import Config
from immune.hive import Hive


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Mosquitto:
    """A private Mosquitto the test starts, stops and restarts.

    Args:
        directory: where its config, log and persistence file go.
        body: the config after the listener line (TLS, ACL, ...).
        full: a whole config instead, its listener to be on ``{port}``.
    """

    def __init__(
        self, directory: Path, body: str = "allow_anonymous true\n", full: str = ""
    ) -> None:
        self.directory = directory
        self.port = free_port()
        self.conf = directory / "mosquitto.conf"
        log = f"log_dest file {directory}/mosquitto.log\nlog_type all\n"
        if os.geteuid() == 0:
            # Started as root, Mosquitto becomes user "mosquitto", who may not
            # read the test's private directory and 0600 keys.
            log += "user root\n"
        text = (
            full.replace("{port}", str(self.port)) + log
            if full
            else (
                f"listener {self.port} 127.0.0.1\n"
                f"persistence true\npersistence_location {directory}/\n"
                "autosave_interval 1\nmax_queued_messages 0\n"
                "max_inflight_messages 0\n" + log + body
            )
        )
        self.conf.write_text(text, encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.directory / "mosquitto.log"
                text = log.read_text() if log.exists() else ""
                pytest.fail(f"mosquitto did not start on {self.port}: {text}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop it as an operator would (SIGTERM: it saves its persistence)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        path = self.directory / "mosquitto.log"
        return path.read_text() if path.exists() else ""


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Start private Mosquitto instances: ``mosquitto(body=...)``."""
    if shutil.which("mosquitto") is None:
        if os.environ.get("IMMUNE_REQUIRE_SERVICES") == "1":
            pytest.fail("the mosquitto binary is missing (IMMUNE_REQUIRE_SERVICES=1)")
        pytest.skip("the mosquitto binary is missing: apt-get install mosquitto")
    started: list[Mosquitto] = []

    def start(body: str = "allow_anonymous true\n", full: str = "") -> Mosquitto:
        directory = tmp_path / f"mosquitto-{len(started)}"
        directory.mkdir()
        broker = Mosquitto(directory, body, full)
        broker.start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


def hive_config(tmp_path: Path, db_url: str, broker: str, prefix: str) -> Config:
    config = config_mod.load(environ={})
    config.hive.database = db_url
    config.mqtt.url = broker
    config.mqtt.topic_prefix = prefix
    config.mqtt.client_id = f"immune-test-hive-{uuid.uuid4().hex[:12]}"
    config.hive.command_key = str(tmp_path / "command.key")
    config.plugins["alert"] = {"console": False, "file": str(tmp_path / "alerts.log")}
    return config


def agent_config(tmp_path: Path, broker: str, prefix: str, **agent: Any) -> Config:
    config = config_mod.load(environ={})
    config.mqtt.url = broker
    config.mqtt.topic_prefix = prefix
    config.mqtt.keepalive = 5
    config.agent.id = agent.pop("id", f"agent-{uuid.uuid4().hex[:8]}")
    config.agent.sensors = ["proc"]
    config.agent.proc_poll_interval = 3600.0  # no host events in the way
    config.agent.batch_max_delay = 0.02
    config.agent.heartbeat_interval = 0.5
    config.agent.spool = str(tmp_path / f"{config.agent.id}.spool")
    for key, value in agent.items():
        setattr(config.agent, key, value)
    return config


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until check() holds, failing after timeout seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


def network_of(hive: Hive) -> Any:
    return next(p.obj for p in hive.plugins.list() if p.name == "network")


@pytest.fixture
async def hive_factory() -> AsyncIterator[Callable[..., Any]]:
    """Start hives (``await hive_factory(config)``); stopped at the end."""
    hives: list[Hive] = []

    async def start(config: Config, **kwargs: Any) -> Hive:
        hive = Hive(config, **kwargs)
        await hive.start()
        hives.append(hive)
        await asyncio.wait_for(network_of(hive).connected.wait(), 10)
        return hive

    yield start
    for hive in hives:
        if not hive.stopping.is_set():
            await hive.stop()
        hive.store.close()


class RunningAgent:
    def __init__(self, agent: Agent, task: asyncio.Task[None], stop: asyncio.Event):
        self.agent, self.task, self.stop_event = agent, task, stop

    async def stop(self) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, 30)


@pytest.fixture
async def agent_factory() -> AsyncIterator[Callable[..., Any]]:
    """Run agents (``await agent_factory(config)``); stopped at the end."""
    running: list[RunningAgent] = []

    async def start(
        config: Config, connect: bool = True, **kwargs: Any
    ) -> RunningAgent:
        stop = asyncio.Event()
        agent = Agent(config, **kwargs)
        task = asyncio.create_task(agent.run(stop), name="test-agent")
        item = RunningAgent(agent, task, stop)
        running.append(item)
        if connect:
            await asyncio.wait_for(agent.connected.wait(), 10)
        return item

    yield start
    for item in running:
        item.stop_event.set()
        if not item.task.done():
            try:
                await asyncio.wait_for(item.task, 30)
            except (TimeoutError, asyncio.CancelledError):
                item.task.cancel()
