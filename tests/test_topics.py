"""MQTT topic layout and client ids."""

from __future__ import annotations

from immune import topics


def test_default_client_id_is_stable_and_tells_prefixes_apart() -> None:
    default = topics.default_client_id("hive", "vm", topics.DEFAULT_PREFIX)
    assert default == "immune-hive-vm"
    lab = topics.default_client_id("hive", "vm", "lab/v1")
    assert lab.startswith("immune-hive-vm-") and lab != default
    assert lab == topics.default_client_id("hive", "vm", "lab/v1")
    assert lab != topics.default_client_id("hive", "vm", "prod/v1")
    assert topics.default_client_id("agent", "web-1", "lab/v1").startswith(
        "immune-agent-web-1-"
    )


def test_agent_topic_refuses_an_id_with_a_trailing_newline() -> None:
    # Python's `$` matches before a final newline: the id is matched whole.
    assert topics.parse_agent_topic("immune/v1", "immune/v1/agents/web-1/events") == (
        "web-1",
        "events",
    )
    assert (
        topics.parse_agent_topic("immune/v1", "immune/v1/agents/web-1\n/events") is None
    )
    assert not topics.is_valid_agent_id("web-1\n")
    assert topics.is_valid_agent_id("web-1")
