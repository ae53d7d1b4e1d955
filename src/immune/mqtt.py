"""MQTT connection settings shared by the hive and the agents.

The broker is named by a URL: ``mqtt://host:port`` for plain TCP (port 1883
by default) or ``mqtts://host:port`` for TLS (8883 by default).
"""

from __future__ import annotations

import logging
import random
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from immune.config import MqttConfig
from immune.errors import ConfigError

#: How long a broker keeps an MQTT 5 persistent session of an absent client.
SESSION_EXPIRY = 7 * 24 * 3600


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


def client_kwargs(config: MqttConfig, address: BrokerAddress) -> dict[str, Any]:
    """Keyword arguments for :class:`aiomqtt.Client` from the configuration."""
    kwargs: dict[str, Any] = {
        "hostname": address.host,
        "port": address.port,
        "keepalive": config.keepalive,
        "username": config.username or address.username,
        "password": config.password or address.password,
    }
    if address.tls:
        kwargs["tls_context"] = tls_context(config)
    elif config.cert_file:
        msg = (
            f"[mqtt] cert_file is set but the broker URL {address} is plain TCP; "
            "use mqtts:// for TLS"
        )
        raise ConfigError(msg)
    return kwargs


def tls_context(config: MqttConfig) -> ssl.SSLContext:
    """A client TLS context: the broker verified against ``ca_file`` (or the
    system's trust store), and this client's certificate for mutual TLS.

    Raises:
        ConfigError: a file is missing or is not a usable PEM certificate/key.
    """
    for name in ("ca_file", "cert_file", "key_file"):
        value = getattr(config, name)
        if value and not Path(value).is_file():
            raise ConfigError(f"[mqtt] {name} {value!r} does not exist")
    if bool(config.cert_file) != bool(config.key_file):
        raise ConfigError("[mqtt] cert_file and key_file must be set together")
    try:
        context = ssl.create_default_context(cafile=config.ca_file or None)
        if config.cert_file:
            context.load_cert_chain(config.cert_file, config.key_file)
    except ssl.SSLError as exc:
        raise ConfigError(f"[mqtt] TLS files unusable: {exc}") from None
    return context


def session_kwargs(config: MqttConfig, *, persistent: bool) -> dict[str, Any]:
    """Protocol and session options for :class:`aiomqtt.Client`.

    A hive in a shared subscription group speaks MQTT 5 (shared
    subscriptions are an MQTT 5 feature); everything else MQTT 3.1.1.
    """
    if not config.shared_group:
        return {"clean_session": not persistent}
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = SESSION_EXPIRY if persistent else 0
    return {
        "protocol": aiomqtt.ProtocolVersion.V5,
        "clean_start": not persistent,
        "properties": properties,
    }


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

    def level(self) -> int:
        """The log level of the next attempt: the first failures are news
        (warning), then only every tenth, so an outage of days does not
        fill the log."""
        if self.attempt < 3 or self.attempt % 10 == 0:
            return logging.WARNING
        return logging.DEBUG

    def next(self) -> float:
        # "Full jitter": spread reconnecting clients so that a broker restart
        # is not followed by all of them at the same instant.
        ceiling = min(self.cap, self.initial * 2**self.attempt)
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0
