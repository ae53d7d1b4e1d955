"""The kmod sensor on packed records and a directory standing in for sysfs.

Unit tests: the records the module really produces are decoded in
test_kmod_guest.py, and the policy files written here are pushed into the
real module there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from immune.agent import kmod
from immune.agent.kmod import (
    RECORD,
    KmodError,
    KmodPolicy,
    KmodSensor,
    apply_policy,
    decode_record,
    decode_records,
    parse_policy,
    read_policy,
    to_event,
)
from immune.agent.sensors import SensorUnavailableError, open_first, registry
from immune.config import AgentConfig
from immune.metrics import Metrics


def pack(**kw: object) -> bytes:
    fields = {
        "ts": 1_700_000_000_000_000_000, "seq": 7, "kind": 3, "sev": 3,
        "outcome": 1, "pid": 42, "ppid": 1, "uid": 1000, "euid": 1000,
        "value": 0, "port": 4444, "family": 2, "reason": 4, "version": 1,
        "addr": bytes([127, 0, 0, 1]), "comm": b"nc", "path": b"",
        "cmdline": b"",
    }  # fmt: skip
    fields.update(kw)
    return RECORD.pack(*fields.values())


def test_connect_record_decoded():
    rec = decode_record(pack())
    assert (rec.kind, rec.severity, rec.outcome) == ("connect", "high", "blocked")
    assert (rec.addr, rec.port, rec.reasons, rec.comm) == (
        "127.0.0.1",
        4444,
        ("port",),
        "nc",
    )
    event = to_event(rec, agent_id="a1", host="h")
    assert (event.kind, event.family, event.outcome, event.sensor) == (
        "connect",
        "inet",
        "blocked",
        "kmod",
    )
    assert event.extra == {"seq": 7, "reasons": "port"}


def test_ipv6_and_exec_records():
    v6 = decode_record(pack(family=10, addr=bytes(15) + b"\x01", reason=0))
    assert v6.addr == "::1" and v6.reasons == ()
    assert to_event(v6, agent_id="a", host="h").family == "inet6"
    ex = decode_record(
        pack(kind=1, path=b"/tmp/x", cmdline=b"/tmp/x -a b", reason=3, outcome=0)
    )
    event = to_event(ex, agent_id="a", host="h")
    assert (event.exe, event.argv) == ("/tmp/x", ["/tmp/x", "-a", "b"])
    assert event.extra is not None and event.extra["reasons"] == "exec_dir,pattern"


def test_setuid_and_fork_records():
    su = to_event(
        decode_record(pack(kind=6, euid=1000, value=0, reason=0x20, sev=4)),
        agent_id="a",
        host="h",
    )
    assert (su.old_euid, su.euid, su.severity) == (1000, 0, "critical")
    fork = to_event(
        decode_record(pack(kind=2, pid=10, value=11)), agent_id="a", host="h"
    )
    assert (fork.pid, fork.ppid) == (11, 10)


def test_undecodable_paths_kept_escaped():
    rec = decode_record(pack(kind=5, path=b"/etc/\xff\xfeshadow"))
    assert rec.path == "/etc/\\xff\\xfeshadow"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\0" * 100, "a kmod record is 512 bytes, got 100"),
        (pack(version=2), "version 2, this agent reads version 1"),
        (pack(kind=99), "unknown kind 99"),
        (pack(sev=9), "unknown severity 9"),
        (pack(outcome=5), "unknown outcome 5"),
    ],
)
def test_bad_records_refused_with_the_reason(raw: bytes, message: str):
    with pytest.raises(KmodError, match=message):
        decode_record(raw)


def test_partial_read_refused():
    with pytest.raises(KmodError, match="not a whole number"):
        decode_records(pack() + b"\0")
    assert [r.seq for r in decode_records(pack() + pack(seq=8))] == [7, 8]


def test_sensor_counts_and_skips_bad_records():
    events: list[object] = []
    metrics = Metrics()
    sensor = KmodSensor(agent_id="a", host="h", emit=events.append, metrics=metrics)
    sensor.handle(pack(version=9))
    sensor.handle(pack(pid=sensor._self))  # the agent's own: skipped
    sensor.handle(pack())
    assert metrics.counters["agent.kmod_bad_records"] == 1
    assert len(events) == 1


def test_missing_module_is_a_clear_unavailability(tmp_path: Path):
    sensor = KmodSensor(
        agent_id="a", host="h", emit=lambda e: None, device=str(tmp_path / "immune")
    )
    with pytest.raises(SensorUnavailableError, match="module is not loaded"):
        sensor.open()
    assert registry()["kmod"] is KmodSensor
    with pytest.raises(SensorUnavailableError, match="kmod unavailable"):
        open_first(
            ["kmod"],
            {"kmod": {"device": str(tmp_path / "immune")}},
            agent_id="a",
            host="h",
            emit=lambda e: None,
        )


def _sysfs(tmp_path: Path) -> Path:
    for name in ("enabled", "block_mode", "monitor_network", "monitor_files",
                 "monitor_credentials", "log_level", "exec_dirs", "patterns",
                 "files", "ports"):  # fmt: skip
        (tmp_path / name).write_text("")
    return tmp_path


def test_policy_written_as_the_module_reads_it(tmp_path: Path):
    sysfs = _sysfs(tmp_path)
    policy = parse_policy(
        {"block_mode": True, "ports": [4444, 31337], "patterns": ["nc ", "| sh"]}
    )
    apply_policy(policy, sysfs)
    assert (sysfs / "ports").read_text() == "4444,31337\n"
    assert (sysfs / "patterns").read_text() == "nc \n| sh\n"
    assert (sysfs / "block_mode").read_text() == "1\n"
    assert (sysfs / "exec_dirs").read_text() == ""  # None: left as it is
    assert read_policy(sysfs).ports == [4444, 31337]


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"ports": [0]}, r"ports\[0\]"),
        ({"ports": [65536]}, r"ports\[0\]"),
        ({"log_level": 3}, "log_level"),
        ({"patterns": ["a\nb"]}, "patterns item 'a\\\\nb'"),
        ({"files": ["x" * 120]}, "files"),
        ({"ports": list(range(1, 40))}, "ports"),
        ({"blok_mode": True}, "blok_mode"),
    ],
)
def test_bad_policy_refused_naming_the_field(policy: dict[str, object], message: str):
    with pytest.raises(KmodError, match=message):
        parse_policy(policy)


def test_policy_for_absent_module_or_refused_value(tmp_path: Path):
    with pytest.raises(KmodError, match="not loaded"):
        apply_policy(KmodPolicy(), tmp_path / "absent")
    sysfs = _sysfs(tmp_path)
    (sysfs / "ports").unlink()
    (sysfs / "ports").mkdir()  # a write that fails, as a refusal would
    with pytest.raises(KmodError, match="refused ports='7'"):
        apply_policy(KmodPolicy(ports=[7]), sysfs)


def test_record_layout_matches_the_header():
    root = Path(__file__).resolve().parents[2]
    header = (root / "kernel" / "immune_kmod" / "immune_uapi.h").read_text()
    assert f"#define IMMUNE_RECORD_SIZE\t{kmod.RECORD_SIZE}" in header
    assert f"#define IMMUNE_RECORD_VERSION\t{kmod.RECORD_VERSION}" in header


def test_sensor_pushes_its_policy_when_it_opens(tmp_path: Path):
    device = tmp_path / "immune"
    os.mkfifo(device)
    keep = os.open(device, os.O_RDWR | os.O_NONBLOCK)
    (tmp_path / "sysfs").mkdir()
    sysfs = _sysfs(tmp_path / "sysfs")
    sensor = KmodSensor(
        agent_id="a",
        host="h",
        emit=lambda e: None,
        device=str(device),
        sysfs=str(sysfs),
        policy={"block_mode": True, "ports": [4444]},
    )
    try:
        sensor.open()
        assert (sysfs / "block_mode").read_text() == "1\n"
        assert (sysfs / "ports").read_text() == "4444\n"
    finally:
        sensor.close()
        os.close(keep)


def test_bad_policy_in_the_agent_config_refused(tmp_path: Path):
    config = AgentConfig(kmod_policy={"ports": [0]})
    with pytest.raises(KmodError, match=r"ports\[0\]"):
        open_first(
            ["kmod"],
            {"kmod": {"policy": config.kmod_policy}},
            agent_id="a",
            host="h",
            emit=lambda e: None,
        )


def test_partial_read_from_the_device_counted(tmp_path: Path):
    device = tmp_path / "immune"
    os.mkfifo(device)
    keep = os.open(device, os.O_RDWR | os.O_NONBLOCK)
    events: list[object] = []
    metrics = Metrics()
    sensor = KmodSensor(
        agent_id="a", host="h", emit=events.append, metrics=metrics, device=str(device)
    )
    sensor.open()
    try:
        os.write(keep, pack() + b"\0" * 100)
        assert sensor.drain() == 1
        assert sensor.drain() == 0  # nothing left: EAGAIN
    finally:
        sensor.close()
        os.close(keep)
    assert len(events) == 1
    assert metrics.counters["agent.kmod_bad_records"] == 1
