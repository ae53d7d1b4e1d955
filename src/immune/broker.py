"""An MQTT broker for ``immune up`` when none is reachable.

``immune up`` uses the configured broker if it answers. Otherwise it starts
Mosquitto as a child process on a free loopback port where Mosquitto is
installed, and else amqtt, a pure-Python broker, inside the process (slower,
see docs/performance.md, but enough for one host).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from immune.errors import BrokerError
from immune.mqtt import BrokerAddress

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT = 10.0


def reachable(address: BrokerAddress, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections at the broker's address."""
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    address = BrokerAddress("127.0.0.1", port, tls=False)
    deadline = asyncio.get_running_loop().time() + STARTUP_TIMEOUT
    while not reachable(address, timeout=0.2):
        if proc.poll() is not None:
            raise BrokerError(f"mosquitto exited with status {proc.returncode}")
        if asyncio.get_running_loop().time() > deadline:
            raise BrokerError(f"no broker listening on 127.0.0.1:{port} after 10 s")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def mosquitto(binary: str = "mosquitto") -> AsyncIterator[str]:
    """Run Mosquitto on a free loopback port; yields its URL."""
    path = shutil.which(binary)
    if path is None:
        raise BrokerError("mosquitto is not installed")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="immune-mosquitto-") as tmp:
        conf = Path(tmp, "mosquitto.conf")
        conf.write_text(
            f"listener {port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "max_queued_messages 100000\n"
            "log_dest stderr\n"
            "log_type error\n"
            "log_type warning\n",
            encoding="utf-8",
        )
        proc = subprocess.Popen([path, "-c", str(conf)], stdin=subprocess.DEVNULL)
        try:
            await _wait_listening(port, proc)
            logger.info("Started Mosquitto (pid %d) on 127.0.0.1:%d.", proc.pid, port)
            yield f"mqtt://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)


@contextlib.asynccontextmanager
async def amqtt_broker() -> AsyncIterator[str]:
    """Run amqtt's broker in this process on a free loopback port."""
    from amqtt.broker import Broker  # imported late: heavy, and rarely needed

    port = free_port()
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {
                "allow_anonymous": True
            }
        },
    }
    broker = Broker(config)
    await broker.start()  # returns once it listens
    try:
        logger.info("Started the amqtt broker on 127.0.0.1:%d.", port)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        await broker.shutdown()


@contextlib.asynccontextmanager
async def embedded() -> AsyncIterator[str]:
    """Start the best broker available here; yields its URL."""
    if shutil.which("mosquitto"):
        async with mosquitto() as url:
            yield url
        return
    logger.warning("Mosquitto is not installed; using the slower amqtt broker.")
    async with amqtt_broker() as url:
        yield url
