"""The exceptions IMMUNE raises on purpose.

Every error a user can cause derives from :class:`ImmuneError`; the CLI shows
its message as one line and exits non-zero.
"""

from __future__ import annotations


class ImmuneError(Exception):
    """Base class of every error IMMUNE raises deliberately."""


class ConfigError(ImmuneError):
    """The configuration file or an environment override is invalid."""


class EventError(ImmuneError):
    """An event or a batch of events was rejected.

    Args:
        reason: what is wrong, for a person; names the field when one is at fault.
        field: the JSON path of the offending field, if any (``$.events[3].pid``).
    """

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


class PayloadTooLargeError(EventError):
    """A payload is larger than the configured limit."""


class PluginError(ImmuneError):
    """A plugin could not be loaded, configured or started.

    Args:
        plugin: the plugin's name.
    """

    def __init__(self, plugin: str, message: str) -> None:
        super().__init__(f"plugin {plugin!r}: {message}")
        self.plugin = plugin


class StorageError(ImmuneError):
    """The database refused an operation the hive cannot do without."""


class BrokerError(ImmuneError):
    """No MQTT broker could be reached or started."""
