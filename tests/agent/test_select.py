"""Choosing sensors by what the host allows, and the gate their events pass."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time

import pytest
from sensing import EventCollector

from immune.agent.policy import PolicyStore, parse
from immune.agent.sensors import (
    Gate,
    RateLimiter,
    SensorUnavailableError,
    open_sensors,
)
from immune.events import Event, new_id, now_ns
from immune.metrics import Metrics

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def event(kind: str = "exec", **fields: object) -> Event:
    return Event(id=new_id(), agent_id="a", host="h", ts=now_ns(), kind=kind, **fields)


def test_rate_limiter_allows_a_burst_then_the_rate() -> None:
    limiter = RateLimiter(rate=1.0, burst=3)
    assert [limiter.allow() for _ in range(4)] == [True, True, True, False]
    limiter.stamp -= 1.0  # one second later
    assert limiter.allow() and not limiter.allow()


def gate_for(policy: dict) -> tuple[Gate, EventCollector, Metrics]:
    store = PolicyStore()
    store.replace(parse(policy))
    collector, metrics = EventCollector(), Metrics()
    return Gate("ebpf", collector, store, metrics), collector, metrics


def test_gate_drops_and_counts_beyond_the_limit() -> None:
    gate, collector, metrics = gate_for(
        {"limits": {"events_per_second": 1, "burst": 2}}
    )
    for _ in range(5):
        gate(event(exe="/bin/ls"))
    assert len(collector.events) == 2
    assert metrics.get("agent.sensor.ebpf.seen") == 5
    assert metrics.get("agent.sensor.ebpf.sent") == 2
    assert metrics.get("agent.sensor.ebpf.dropped") == 3
    assert metrics.get("agent.dropped") == 3


def test_gate_never_drops_what_a_rule_matched() -> None:
    gate, collector, _ = gate_for({"limits": {"events_per_second": 1, "burst": 1}})
    for _ in range(3):
        gate(event(exe="/tmp/x"))
    assert len(collector.events) == 3


def test_gate_applies_the_policy_per_kind() -> None:
    gate, collector, _ = gate_for({})
    gate(event(exe="/tmp/dropper"))
    gate(event("connect", port=4444, addr="10.0.0.1"))
    gate(event("connect", port=443, addr="10.0.0.1"))
    gate(event("open", path="/etc/shadow"))
    gate(event("setuid", old_euid=1000, euid=0))
    gate(event(exe="/usr/bin/bash", argv=["bash", "-i"]))
    rules = [(e.extra or {}).get("rule") for e in collector.events]
    assert rules == [
        "exec_path",
        "blocked_port",
        None,
        "sensitive_file",
        "setuid_root",
        "reverse_shell",
    ]
    assert [e.severity for e in collector.events][:2] == ["high", "high"]
    assert collector.events[4].severity == "critical"


def test_gate_kills_a_blocked_reverse_shell() -> None:
    gate, collector, metrics = gate_for({"cmdline": {"mode": "block"}})
    child = subprocess.Popen(["sleep", "30"])
    try:
        gate(event(pid=child.pid, exe="/bin/sh", argv=["sh", "-c", "curl x | sh"]))
        assert child.wait(5) == -9
    finally:
        child.kill()
    (seen,) = collector.events
    assert seen.outcome == "blocked"
    assert seen.extra is not None and seen.extra["enforced"] == "killed"
    assert metrics.get("agent.sensor.ebpf.blocked") == 1


def test_unknown_and_unavailable_sensors_are_named(caplog) -> None:
    caplog.set_level(logging.INFO, "immune.agent.sensors")
    collector = EventCollector()
    sensors = open_sensors(
        ["nonexistent", "proc", "cn_proc"],
        {"proc": {"interval": 0.05}},
        agent_id="a",
        host="h",
        emit=collector,
    )
    assert sensors.names == ["proc"]
    assert "unknown sensor" in sensors.off["nonexistent"]
    assert sensors.off["cn_proc"] == "not needed, proc reports process events"
    assert "Sensors running: proc" in caplog.text
    assert "Sensor nonexistent off: unknown sensor" in caplog.text


def test_no_sensor_at_all_says_every_reason() -> None:
    with pytest.raises(SensorUnavailableError, match="nope: unknown sensor"):
        open_sensors(["nope"], agent_id="a", host="h", emit=EventCollector())


@pytest.mark.root
@needs_root
def test_root_runs_ebpf_for_telemetry_and_fanotify_for_blocking(caplog) -> None:
    caplog.set_level(logging.INFO, "immune.agent.sensors")
    collector = EventCollector()
    sensors = open_sensors(
        ["ebpf", "fanotify", "cn_proc", "proc"],
        policy=PolicyStore(),
        agent_id="a",
        host="h",
        emit=collector,
    )
    try:
        assert sensors.names == ["ebpf", "fanotify"]
        assert sensors.off == {
            "cn_proc": "not needed, ebpf reports process events",
            "proc": "not needed, ebpf reports process events",
        }
        assert sensors.sensors[1].block_only  # type: ignore[attr-defined]
        sensors.start()
        proc = subprocess.Popen(["/bin/true", "immune-select-test"])
        proc.wait()
        seen = collector.wait_for(lambda e: e.kind == "exec" and e.pid == proc.pid)
        assert seen.sensor == "ebpf"
    finally:
        sensors.stop()
    assert "Sensor cn_proc off: not needed" in caplog.text
    assert not sensors.running


def test_policy_file_is_reloaded_when_it_changes(tmp_path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("[ports]\nports = [4444]\n")
    store = PolicyStore(path)
    assert store.rules.ports == {4444}
    store.watch(interval=0.05)
    try:
        time.sleep(0.05)
        path.write_text("[ports]\nports = [9999]\n")
        os.utime(path, (time.time() + 5, time.time() + 5))
        deadline = time.monotonic() + 5
        while store.rules.ports != {9999} and time.monotonic() < deadline:
            time.sleep(0.02)
        assert store.rules.ports == {9999}
        # A broken file keeps the rules in force.
        path.write_text("[ports\n")
        os.utime(path, (time.time() + 10, time.time() + 10))
        deadline = time.monotonic() + 5
        while store.refused == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert store.refused == 1 and store.rules.ports == {9999}
    finally:
        store.close()


async def test_sighup_reloads_the_policy_file(tmp_path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("[ports]\nports = [4444]\n")
    store = PolicyStore(path)
    sensors = open_sensors(
        ["proc"],
        {"proc": {"interval": 0.05}},
        policy=store,
        agent_id="a",
        host="h",
        emit=EventCollector(),
    )
    sensors.start()
    try:
        # Within half a second: before the file watch first looks (after 1 s).
        path.write_text("[ports]\nports = [9999]\n")
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(25):
            if store.rules.ports == {9999}:
                break
            await asyncio.sleep(0.02)
        assert store.rules.ports == {9999}
    finally:
        sensors.stop()
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL


@pytest.mark.root
@needs_root
def test_without_tracefs_the_agent_falls_back_to_cn_proc_and_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    from pathlib import Path

    from immune.agent import libbpf

    monkeypatch.setattr(libbpf, "TRACEFS", (Path("/nonexistent/tracing"),))
    caplog.set_level(logging.INFO, "immune.agent.sensors")
    sensors = open_sensors(
        ["ebpf", "cn_proc", "proc"], agent_id="a", host="h", emit=EventCollector()
    )
    sensors.close()
    assert sensors.names == ["cn_proc"]
    assert "mount -t tracefs nodev /sys/kernel/tracing" in sensors.off["ebpf"]
    assert "Sensor ebpf off: tracefs is not mounted" in caplog.text
