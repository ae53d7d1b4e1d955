"""MQTT topic layout shared by the hive and the agents (see docs/mqtt.md).

Every topic lives under a prefix (``immune/v1`` by default) so that a broker
can host other traffic, and the version in it lets a future layout coexist.
"""

from __future__ import annotations

import hashlib
import re

DEFAULT_PREFIX = "immune/v1"

# What an agent publishes, under <prefix>/agents/<agent_id>/.
EVENTS = "events"
REGISTER = "register"
HEARTBEAT = "heartbeat"
STATUS = "status"
#: Command acknowledgements and results, agent -> hive.
ACKS = "acks"
# What the hive publishes to one agent.
COMMANDS = "commands"
#: Receipts for stored event batches, hive -> agent.
RECEIPTS = "receipts"

# Matched whole (fullmatch): with `$`, "web-1\n" would pass.
_AGENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def agent_topic(prefix: str, agent_id: str, leaf: str) -> str:
    """The topic ``<prefix>/agents/<agent_id>/<leaf>``."""
    return f"{prefix}/agents/{agent_id}/{leaf}"


def agent_filter(prefix: str, leaf: str) -> str:
    """A subscription filter matching ``leaf`` of every agent."""
    return f"{prefix}/agents/+/{leaf}"


def alerts_topic(prefix: str, severity: str) -> str:
    """Where the hive publishes alerts for integrators."""
    return f"{prefix}/alerts/{severity}"


def hive_status_topic(prefix: str) -> str:
    return f"{prefix}/hive/status"


def broadcast_topic(prefix: str) -> str:
    """Where the hive publishes commands for every agent."""
    return f"{prefix}/broadcast/{COMMANDS}"


def shared(group: str, topic_filter: str) -> str:
    """An MQTT 5 shared subscription to ``topic_filter``, or the filter alone.

    Args:
        group: the share group name; empty for an ordinary subscription.
    """
    return f"$share/{group}/{topic_filter}" if group else topic_filter


def parse_agent_topic(prefix: str, topic: str) -> tuple[str, str] | None:
    """Split ``<prefix>/agents/<id>/<leaf>`` into (id, leaf).

    Returns None when the topic is not an agent topic or the id is not a valid
    agent id, so a caller can refuse the message with a reason.
    """
    head = f"{prefix}/agents/"
    if not topic.startswith(head):
        return None
    parts = topic[len(head) :].split("/")
    if len(parts) != 2 or not _AGENT_ID.fullmatch(parts[0]):
        return None
    return parts[0], parts[1]


def is_valid_agent_id(agent_id: str) -> bool:
    return bool(_AGENT_ID.fullmatch(agent_id))


def default_client_id(role: str, name: str, prefix: str) -> str:
    """The MQTT client id of a hive or agent when none is configured.

    ``immune-<role>-<name>``; under a topic prefix other than the default, a
    short hash of the prefix is added, so that two installations sharing a
    broker (and a host name or agent id) do not take each other's session.
    """
    ident = f"immune-{role}-{name}"
    if prefix != DEFAULT_PREFIX:
        ident += "-" + hashlib.sha256(prefix.encode()).hexdigest()[:8]
    return ident
