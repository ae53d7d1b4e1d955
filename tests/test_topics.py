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
