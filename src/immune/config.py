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
    #: An agent silent this long is marked offline (checked every
    #: ``offline_check_interval`` seconds).
    agent_timeout: Seconds = 120.0
    offline_check_interval: Seconds = 30.0
    #: The Ed25519 private key that signs commands to agents (PEM, mode
    #: 0600); made on first use when missing, by default ``command.key`` in
    #: :func:`state_dir`. Agents get its public half.
    command_key: str = ""
    #: MQTT messages per second accepted from one agent (a token bucket of
    #: ``agent_rate_burst`` messages); beyond, messages are dropped, counted,
    #: and an alert is raised.
    agent_rate_limit: Seconds = 200.0
    agent_rate_burst: Positive = 2000
    #: At stop, how long to keep trying to write what is pending before
    #: giving up with an error that says how many rows are lost.
    shutdown_timeout: Seconds = 60.0
    #: Alerts of one rule, severity, agent and key within this many seconds
    #: are one alert whose count grows; 0 turns that off.
    alert_window: Annotated[float, msgspec.Meta(ge=0)] = 300.0
    #: The most event ids one alert keeps (its count goes on past it).
    alert_max_event_ids: Positive = 100
    #: Windows of particular rules, by rule id (0: never fold that rule).
    alert_rule_windows: dict[str, Annotated[float, msgspec.Meta(ge=0)]] = msgspec.field(
        default_factory=dict
    )


class StorageConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    #: Rows per transaction. Large: the writer process spends a batch's time
    #: on it alone, while the hive gets the next batch ready.
    batch_size: Positive = 5000
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
    #: Defaults to ``immune-hive-<hostname>`` / ``immune-agent-<agent id>``,
    #: plus a hash of ``topic_prefix`` when it is not the default.
    client_id: str = ""
    #: Ask the broker to keep our subscriptions and queue QoS 1 messages while
    #: we are away (MQTT clean_session false); needs a stable client_id.
    persistent_session: bool = True
    #: TLS (``mqtts://``): the CA that signed the broker's certificate (the
    #: system's trust store when empty), and for mutual TLS this client's
    #: certificate and private key (PEM files, ``immune pki``).
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    #: Hive only: share the agents' stream with the other hive processes of
    #: this MQTT 5 shared subscription group (``$share/<group>/...``).
    shared_group: str = ""


class AgentConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    #: Defaults to the host name.
    id: str = ""
    #: Sensors in order of preference: the first telemetry sensor that works
    #: (ebpf, audit, cn_proc, proc) and every enforcement one (fanotify).
    sensors: list[str] = msgspec.field(
        default_factory=lambda: ["ebpf", "fanotify", "cn_proc", "proc"]
    )
    #: The local policy file (TOML, see docs/policy.md); empty: the defaults.
    policy: str = ""
    #: fanotify marks: "directory" (files directly in each) or "mount".
    fanotify_scope: Literal["directory", "mount"] = "directory"
    batch_max_events: Positive = 500
    #: Largest MQTT message the agent sends; bigger batches are split. Keep
    #: it well under the hive's ``max_payload_bytes``.
    batch_max_bytes: Annotated[int, msgspec.Meta(ge=4096)] = 256 * 1024
    batch_max_delay: Seconds = 0.2
    heartbeat_interval: Seconds = 30.0
    proc_poll_interval: Seconds = 0.25
    #: Policy written into the kernel module's tunables when the ``kmod``
    #: sensor opens (keys of ``immune.agent.kmod.KmodPolicy``); empty: as is.
    kmod_policy: dict[str, Any] = msgspec.field(default_factory=dict)
    #: The SQLite file holding events until the hive has stored them; by
    #: default ``agent-<id>.spool`` in ``$IMMUNE_STATE_DIR``, else
    #: ``/var/lib/immune`` (root) or ``~/.local/state/immune``.
    spool: str = ""
    #: Events the spool holds; when full, the oldest are dropped and counted.
    spool_max_events: Positive = 1_000_000
    #: Batches sent but not yet receipted by the hive, at most.
    spool_window: Positive = 64
    #: Send unreceipted batches again after this long without a receipt.
    receipt_timeout: Seconds = 30.0
    #: The hive's command public key (PEM); without it every command is refused.
    command_public_key: str = ""
    #: Commands expiring further ahead than this are refused (bounds replay
    #: memory).
    max_command_ttl: Seconds = 86400.0
    #: Where the response actions keep the vault, its key and the record of
    #: frozen and jailed processes; by default ``actions-<id>`` in the state
    #: directory (see ``spool``).
    actions_dir: str = ""
    #: IMMUNE's cgroup (one name under the cgroup v2 root) that ``freeze``
    #: and ``jail`` move processes into.
    cgroup_prefix: str = "immune"
    #: Run the network actions' nftables in this named network namespace
    #: (``/run/netns/<name>``) instead of the agent's own; empty: the host's.
    actions_netns: str = ""


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


def state_dir() -> Path:
    """Where IMMUNE keeps state files (spool, keys) not named in the config.

    ``$IMMUNE_STATE_DIR`` when set, else ``/var/lib/immune`` for root and
    ``~/.local/state/immune`` for anyone else.
    """
    base = os.environ.get("IMMUNE_STATE_DIR")
    if base:
        return Path(base)
    if os.geteuid() == 0:
        return Path("/var/lib/immune")
    return Path.home() / ".local" / "state" / "immune"


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
