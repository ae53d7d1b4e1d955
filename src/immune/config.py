"""Configuration: a TOML file, overridden by environment variables.

Every setting has a default, so IMMUNE runs with no file at all. A variable
``IMMUNE_<SECTION>__<KEY>`` overrides ``[section] key`` (for example
``IMMUNE_MQTT__URL=mqtts://broker:8883``); its value is read as TOML when it
parses as such (numbers, booleans, arrays) and as a plain string otherwise,
and always as a plain string for a setting that is text (a password of
digits stays a string).
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from immune.errors import ConfigError
from immune.topics import DEFAULT_PREFIX

ENV_PREFIX = "IMMUNE_"
DEFAULT_FILE = "immune.toml"

Positive = Annotated[int, msgspec.Meta(gt=0)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class HiveConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    database: str = "sqlite:///immune.db"
    #: Largest MQTT payload accepted, in bytes; larger ones become dead letters.
    max_payload_bytes: Positive = 1024 * 1024
    bus_shards: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    bus_queue_size: Positive = 10_000
    plugin_dirs: list[str] = msgspec.field(default_factory=list)
    disabled_plugins: list[str] = msgspec.field(default_factory=list)
    #: An agent silent this long is marked offline (checked every 30 s).
    agent_timeout: Seconds = 120.0
    #: At stop, how long to keep trying to write what is pending before
    #: giving up with an error that says how many rows are lost.
    shutdown_timeout: Seconds = 60.0


class StorageConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    batch_size: Positive = 1000
    flush_interval: Seconds = 0.05
    #: Rows held in memory before writers wait (backpressure, never a drop).
    max_pending: Positive = 50_000
    #: Where event rows are written: "process" (a child process with its own
    #: connection, on another core) or "thread" (a thread of the hive).
    writer: Literal["process", "thread"] = "process"


class MqttConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    #: ``mqtt://host:port`` or ``mqtts://host:port``; empty means "embedded".
    url: str = "mqtt://127.0.0.1:1883"
    topic_prefix: str = DEFAULT_PREFIX
    username: str | None = None
    password: str | None = None
    keepalive: Positive = 30
    #: Defaults to ``immune-hive-<hostname>`` / ``immune-agent-<agent id>``.
    client_id: str = ""
    #: Ask the broker to keep our subscriptions and queue QoS 1 messages while
    #: we are away (MQTT clean_session false); needs a stable client_id.
    persistent_session: bool = True


class AgentConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    #: Defaults to the host name.
    id: str = ""
    #: Sensors in order of preference; the first that works is used.
    sensors: list[str] = msgspec.field(default_factory=lambda: ["cn_proc", "proc"])
    batch_max_events: Positive = 500
    #: Largest MQTT message the agent sends; bigger batches are split. Keep
    #: it well under the hive's ``max_payload_bytes``.
    batch_max_bytes: Annotated[int, msgspec.Meta(ge=4096)] = 256 * 1024
    batch_max_delay: Seconds = 0.2
    heartbeat_interval: Seconds = 30.0
    proc_poll_interval: Seconds = 0.25


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    hive: HiveConfig = msgspec.field(default_factory=HiveConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    mqtt: MqttConfig = msgspec.field(default_factory=MqttConfig)
    agent: AgentConfig = msgspec.field(default_factory=AgentConfig)
    #: One table per plugin, ``[plugins.<name>]``, handed to that plugin.
    plugins: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)

    @property
    def agent_id(self) -> str:
        return self.agent.id or socket.gethostname()


_SECTIONS: dict[str, type[msgspec.Struct]] = {
    "hive": HiveConfig,
    "storage": StorageConfig,
    "mqtt": MqttConfig,
    "agent": AgentConfig,
}


def _is_text_setting(path: list[str]) -> bool:
    """Whether ``[section] key`` is a string setting (a password, an id...)."""
    section = _SECTIONS.get(path[0]) if len(path) == 2 else None
    if section is None:
        return False
    types = {f.name: f.type for f in msgspec.structs.fields(section)}
    return types.get(path[1]) in (str, str | None)


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        try:
            # A password "123456" or an agent id "2024-01-01" is text, not
            # the number or date TOML would make of it.
            value = raw if _is_text_setting(path) else tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment variable {name} conflicts with another")
        node[path[-1]] = value
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Load the configuration.

    Args:
        path: a TOML file. When None, ``immune.toml`` in the working
            directory is read if it exists, or the file named by
            ``IMMUNE_CONFIG``.
        environ: the environment to read overrides from (``os.environ``).

    Raises:
        ConfigError: the file is missing, is not TOML, or a value is invalid;
            the message names the file and the key.
    """
    environ = dict(os.environ if environ is None else environ)
    source = "defaults"
    data: dict[str, Any] = {}
    if path is None:
        path = environ.get("IMMUNE_CONFIG") or (
            DEFAULT_FILE if Path(DEFAULT_FILE).exists() else None
        )
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"configuration file {source} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {source}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source} is not valid TOML: {exc}") from None

    environ.pop("IMMUNE_CONFIG", None)
    data = _merge(data, _env_overrides(environ))
    try:
        return msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(
            f"invalid configuration ({source} and IMMUNE_*): {exc}"
        ) from None
