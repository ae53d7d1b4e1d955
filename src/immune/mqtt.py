"""MQTT connection settings shared by the hive and the agents.

The broker is named by a URL: ``mqtt://host:port`` for plain TCP (port 1883
by default) or ``mqtts://host:port`` for TLS (8883 by default).
"""

from __future__ import annotations

import random
import ssl
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from immune.config import MqttConfig
from immune.errors import ConfigError


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:
        # Never print the password.
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"


def parse_url(url: str) -> BrokerAddress:
    """Parse a broker URL.

    Raises:
        ConfigError: the scheme is not ``mqtt``/``mqtts`` or the URL has no host.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        msg = f"broker URL {url!r} must start with mqtt:// or mqtts://"
        raise ConfigError(msg)
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ConfigError(f"broker URL {url!r} has an invalid port") from None
    if not parts.hostname:
        raise ConfigError(f"broker URL {url!r} names no host")
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return BrokerAddress(parts.hostname, port, tls, user, password)


def client_kwargs(config: MqttConfig, address: BrokerAddress) -> dict[str, object]:
    """Keyword arguments for :class:`aiomqtt.Client` from the configuration."""
    kwargs: dict[str, object] = {
        "hostname": address.host,
        "port": address.port,
        "keepalive": config.keepalive,
        "username": config.username or address.username,
        "password": config.password or address.password,
    }
    if address.tls:
        kwargs["tls_context"] = ssl.create_default_context()
    return kwargs


class Backoff:
    """Jittered exponential delays between reconnection attempts.

    Args:
        initial: the first delay, in seconds.
        cap: the longest delay.
    """

    def __init__(self, initial: float = 0.5, cap: float = 30.0) -> None:
        self.initial = initial
        self.cap = cap
        self.attempt = 0

    def next(self) -> float:
        # "Full jitter": spread reconnecting clients so that a broker restart
        # is not followed by all of them at the same instant.
        ceiling = min(self.cap, self.initial * 2**self.attempt)
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0
