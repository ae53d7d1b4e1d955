"""The kernel module in a real Linux kernel: Debian's 6.1, booted in QEMU.

One boot (the ``guest`` fixture) runs every step; each test checks what the
guest's programs were told by the kernel (``RESULT`` lines) and the records
the module produced (``REC`` lines, decoded by the agent's decoder).
"""

from __future__ import annotations

import errno
import os
import threading

import msgspec
import pytest
from kmodguest import TUNABLES, TUNED_POLICY, Built, GuestRun, KernelTools

from immune.agent.kmod import (
    RECORD_SIZE,
    KmodSensor,
    Record,
    read_policy,
    read_stats,
    to_event,
)
from immune.events import Event, parse_event
from immune.metrics import Metrics

pytestmark = pytest.mark.qemu


def _one(records: list[Record], **want: object) -> Record:
    found = [r for r in records if all(getattr(r, k) == v for k, v in want.items())]
    assert len(found) == 1, f"want one record with {want}, got {found}"
    return found[0]


def _pid(guest: GuestRun, step: str, what: str) -> int:
    return int(guest.step(step).result(what)["pid"])


def _dump(guest: GuestRun, phase: str) -> list[Record]:
    return guest.step(f"{phase} dump").records


def test_module_built_for_the_booted_kernel(built: Built, kernel_tools: KernelTools):
    modinfo = built.module.read_bytes()
    assert f"vermagic={kernel_tools.version} ".encode() in modinfo
    assert "warning" not in built.build_log.lower(), built.build_log


def test_module_loads_unloads_and_guest_powers_off(guest: GuestRun):
    assert guest.step("insmod").result("insmod")["rc"] == "0"
    assert guest.step("rmmod").result("rmmod")["rc"] == "0"
    assert "reboot: Power down" in guest.console
    assert guest.returncode == 0
    assert any("loaded: 6 hooks" in line for line in guest.dmesg)
    assert any("unloaded:" in line for line in guest.dmesg)
    assert not [line for line in guest.console.split("\n") if "BUG:" in line]
    assert "Call Trace" not in guest.console
    assert guest.kernel_errors == []  # no warning, oops or stall in dmesg


def test_exec_from_tmp_reported_in_audit_refused_in_block(guest: GuestRun):
    audit = guest.step("audit exec_tmp")
    assert "SCRIPT-RAN" in audit.output
    rec = _one(_dump(guest, "audit"), kind="exec", path="/tmp/dropper.sh")
    assert (rec.outcome, rec.severity, rec.reasons) == (
        "allowed",
        "high",
        ("exec_dir",),
    )
    assert rec.cmdline == "/tmp/dropper.sh"

    block = guest.step("block exec_tmp")
    assert "SCRIPT-RAN" not in block.output
    result = block.result("exec")
    assert int(result["errno"]) == errno.EPERM
    rec = _one(_dump(guest, "block"), kind="exec", path="/tmp/dropper.sh")
    assert (rec.outcome, rec.reasons, rec.pid) == (
        "blocked",
        ("exec_dir",),
        int(result["pid"]),
    )


def test_reverse_shell_command_line_matched_and_refused(guest: GuestRun):
    assert "PATTERN-RAN" in guest.step("audit exec_pattern").output
    audit = [
        r
        for r in _dump(guest, "audit")
        if r.kind == "exec" and "nc 127.0.0.1 4444" in r.cmdline
    ]
    assert audit and all("pattern" in r.reasons for r in audit)
    assert {r.outcome for r in audit} == {"allowed"}

    block = guest.step("block exec_pattern")
    assert "PATTERN-RAN" not in block.output
    assert any("Operation not permitted" in line for line in block.output)
    refused = [
        r
        for r in _dump(guest, "block")
        if r.kind == "exec" and "nc 127.0.0.1 4444" in r.cmdline
    ]
    assert refused and refused[0].outcome == "blocked"
    assert refused[0].reasons == ("pattern",)


def test_ordinary_exec_allowed_in_block_mode(guest: GuestRun):
    assert guest.step("block exec_ok").result("exec_ok")["rc"] == "0"
    rec = [
        r
        for r in _dump(guest, "block")
        if r.kind == "exec" and r.cmdline == "/bin/true"
    ]
    assert rec and rec[0].outcome == "allowed" and rec[0].reasons == ()
    assert rec[0].path == "/bin/busybox"  # the resolved file, not the symlink


def test_connect_to_blocked_port_refused_in_block_mode(guest: GuestRun):
    audit = guest.step("audit connect_blocked").result("connect")
    assert int(audit["errno"]) == errno.ECONNREFUSED
    rec = _one(_dump(guest, "audit"), kind="connect", pid=int(audit["pid"]))
    assert (rec.addr, rec.port, rec.reasons, rec.outcome) == (
        "127.0.0.1",
        4444,
        ("port",),
        "allowed",
    )

    block = guest.step("block connect_blocked").result("connect")
    assert int(block["errno"]) == errno.EPERM
    rec = _one(_dump(guest, "block"), kind="connect", pid=int(block["pid"]))
    assert (rec.port, rec.outcome, rec.severity) == (4444, "blocked", "high")

    other = guest.step("block connect_ok").result("connect")
    assert int(other["errno"]) == errno.ECONNREFUSED
    rec = _one(_dump(guest, "block"), kind="connect", pid=int(other["pid"]))
    assert (rec.port, rec.outcome, rec.reasons) == (8080, "allowed", ())


def test_privileged_bind_by_non_root_flagged(guest: GuestRun):
    result = guest.step("audit bind_priv").result("bind")
    assert (result["euid"], int(result["errno"])) == ("1000", errno.EACCES)
    rec = _one(_dump(guest, "audit"), kind="bind", pid=int(result["pid"]))
    assert (rec.port, rec.uid, rec.euid) == (80, 1000, 1000)
    assert rec.reasons == ("privileged_port",) and rec.severity == "high"


def test_sensitive_open_audited(guest: GuestRun):
    for phase in ("audit", "block"):
        result = guest.step(f"{phase} open_shadow").result("open")
        assert int(result["rc"]) >= 0  # audited, never refused
        rec = _one(_dump(guest, phase), kind="open", pid=int(result["pid"]))
        assert (rec.path, rec.reasons, rec.severity) == (
            "/etc/shadow",
            ("file",),
            "medium",
        )


def test_setuid_to_root_allowed_in_audit_refused_in_block(guest: GuestRun):
    audit = guest.step("audit setuid").result("setuid")
    assert (audit["rc"], audit["euid"]) == ("0", "0")
    recs = [
        r
        for r in _dump(guest, "audit")
        if r.kind == "setuid" and r.pid == int(audit["pid"])
    ]
    # setresuid(1000, 1000, 0) first: a change of uid, not a threat.
    assert [(r.euid, r.value, r.reasons) for r in recs] == [
        (0, 1000, ()),
        (1000, 0, ("to_root",)),
    ]
    assert recs[1].severity == "critical" and recs[1].outcome == "allowed"

    block = guest.step("block setuid").result("setuid")
    assert (int(block["errno"]), block["euid"]) == (errno.EPERM, "1000")
    rec = _one(_dump(guest, "block"), kind="setuid", pid=int(block["pid"]), value=0)
    assert (rec.uid, rec.euid, rec.outcome) == (1000, 1000, "blocked")


def test_fork_reported_with_child_pid(guest: GuestRun):
    child = _pid(guest, "audit connect_ok", "connect")
    rec = _one(_dump(guest, "audit"), kind="fork", value=child)
    assert rec.pid == 1 and rec.comm == "init"  # /init's shell forked it


def test_records_in_order_none_lost(guest: GuestRun):
    dumped = [
        r for p in ("audit", "block", "tunables", "disabled") for r in _dump(guest, p)
    ]
    seqs = [r.seq for r in dumped]
    assert seqs == list(range(1, len(seqs) + 1))
    times = [r.ts_ns for r in dumped]
    assert times == sorted(times)
    assert {r.kind for r in dumped} == {
        "exec",
        "fork",
        "connect",
        "bind",
        "open",
        "setuid",
    }


def test_decoder_turns_guest_records_into_valid_events(guest: GuestRun):
    assert len(guest.raw_records) > 50
    events = [to_event(r, agent_id="guest", host="qemu") for r in guest.records]
    for event in events:
        # Through JSON and the hive's validation, as over MQTT.
        again = parse_event(msgspec.json.decode(msgspec.json.encode(event)))
        assert again == event
    setuid = next(e for e in events if e.kind == "setuid" and e.outcome == "blocked")
    assert (setuid.old_euid, setuid.euid, setuid.severity) == (1000, 0, "critical")
    connect = next(e for e in events if e.kind == "connect" and e.outcome == "blocked")
    assert (connect.addr, connect.port, connect.family) == ("127.0.0.1", 4444, "inet")
    assert connect.extra == {"seq": connect.extra["seq"], "reasons": "port"}
    exe = next(e for e in events if e.kind == "exec" and e.exe == "/tmp/dropper.sh")
    assert exe.argv == ["/tmp/dropper.sh"] and exe.sensor == "kmod"
    fork = next(e for e in events if e.kind == "fork")
    rec = next(
        r for r in guest.records if r.kind == "fork" and r.seq == fork.extra["seq"]
    )
    assert (fork.pid, fork.ppid) == (rec.value, rec.pid)


def test_sensor_reads_guest_records_from_a_device(guest: GuestRun, tmp_path):
    # The bytes the guest read from /dev/immune, served by a FIFO.
    fifo = tmp_path / "immune"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    events: list[Event] = []
    metrics = Metrics()
    sensor = KmodSensor(
        agent_id="guest", host="qemu", emit=events.append, metrics=metrics,
        device=str(fifo), sysfs=str(tmp_path / "absent"),
    )  # fmt: skip
    sensor.open()
    try:
        batch = b"".join(guest.raw_records[:8])
        os.write(writer, batch + b"\x00" * RECORD_SIZE)  # and one bad record
        assert sensor.drain() == 9
    finally:
        sensor.close()
        os.close(writer)
    assert [e.extra["seq"] for e in events if e.extra] == [
        r.seq for r in guest.records[:8]
    ]
    assert metrics.counters["agent.kmod_records"] == 9
    assert metrics.counters["agent.kmod_bad_records"] == 1


def _tunable_dir(guest: GuestRun, tmp_path):
    for name in TUNABLES:
        (tmp_path / name).write_bytes(bytes.fromhex(guest.tunables[name][-1]))
    return tmp_path


def test_agent_policy_pushed_into_tunables(guest: GuestRun, tmp_path):
    step = guest.step("tunables")
    for name in TUNABLES:
        assert step.result(f"policy_{name}")["rc"] == "0"
    # What the module holds, read back, is the policy the agent wrote.
    assert read_policy(_tunable_dir(guest, tmp_path)) == TUNED_POLICY
    assert guest.tunables["ports_after"] == ["7777,31337"]
    assert step.result("ports_bad")["rc"] != "0"


def test_tuned_lists_take_effect(guest: GuestRun):
    old = guest.step("tunables connect_4444").result("connect")
    assert int(old["errno"]) == errno.ECONNREFUSED  # no longer in the list
    new = guest.step("tunables connect_7777").result("connect")
    assert int(new["errno"]) == errno.EPERM
    assert "SCRIPT-RAN" in guest.step("tunables exec_tmp").output  # /tmp/ dropped
    rec = _one(_dump(guest, "tunables"), kind="connect", port=7777)
    assert rec.outcome == "blocked"


def test_disabled_module_reports_nothing(guest: GuestRun):
    assert "SCRIPT-RAN" in guest.step("disabled exec_tmp").output
    recs = _dump(guest, "disabled")
    assert not [r for r in recs if r.path == "/tmp/dropper.sh"]
    # Re-enabled: the dump's own exec is reported again.
    assert [r for r in recs if r.kind == "exec" and "dump" in r.cmdline]


def _drained(guest: GuestRun) -> tuple[str, str]:
    lines = [x for x in guest.step("stress").output if x.startswith("DRAINED ")]
    assert len(lines) == 1, guest.step("stress").output
    count, bad = lines[0].split()[1:]
    return count, bad.removeprefix("bad=")


def test_hooks_on_two_cpus_while_a_reader_drains(guest: GuestRun):
    assert guest.tunables["cpus"] == ["2"]
    out = guest.step("stress").output
    assert sum(line.startswith("BENCH ") for line in out) == 3, out
    count, bad = _drained(guest)
    # 3,000 sensitive opens and 1,000 connects at least, in order, intact.
    assert int(count) >= 4000 and bad == "0"


def test_full_ring_counts_drops(guest: GuestRun, tmp_path):
    words = guest.tunables["stats"][-1].split()
    pairs = zip(words[::2], words[1::2], strict=True)
    (tmp_path / "stats").write_text("".join(f"{k} {v}\n" for k, v in pairs))
    stats = read_stats(tmp_path)
    assert stats["capacity"] == 1024 and stats["queued"] == 1024
    assert stats["drops"] >= 1100 - 1024
    assert "COUNTED 1024 errno=11" in guest.step("flood").output
    dumped = [
        r for p in ("audit", "block", "tunables", "disabled") for r in _dump(guest, p)
    ]
    drained = int(_drained(guest)[0])
    # Every record produced was read, is queued, or was dropped and counted.
    read = len(dumped) + drained
    assert stats["events"] == read + stats["queued"] + stats["drops"]
    assert stats["blocks"] == sum(r.outcome == "blocked" for r in dumped)
    assert stats["threats"] >= sum(bool(r.reasons) for r in dumped) + 1100
    assert stats["missed"] == 0


def test_log_level_and_escaped_log_lines(guest: GuestRun):
    # Level 1 (default): threats only, so the plain connect was not logged.
    quiet = _pid(guest, "audit connect_ok", "connect")
    assert not [line for line in guest.dmesg if f"(pid={quiet} " in line]
    # Level 2 (the tuned policy): every record, the stress phase's too.
    assert any("connect port 8080" in line for line in guest.dmesg)
    # A newline in a file name is escaped, not a forged log line.
    assert int(guest.step("block exec_newline").result("exec")["errno"]) == 1
    assert any("exec /tmp/x\\nimmune: forged" in line for line in guest.dmesg)
    assert not [line for line in guest.dmesg if line.startswith("immune: forged")]


def test_sensor_thread_streams_guest_records(guest: GuestRun, tmp_path):
    fifo = tmp_path / "immune"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    got = threading.Event()
    events: list[Event] = []

    def emit(event: Event) -> None:
        events.append(event)
        if len(events) == 40:
            got.set()

    sensor = KmodSensor(agent_id="guest", host="qemu", emit=emit, device=str(fifo))
    sensor.open()
    sensor.start()
    try:
        # In bursts, as the module fills the ring; 8 records are 4,096
        # bytes, which a pipe writes at once (PIPE_BUF), as the device does.
        for i in range(0, 40, 8):
            os.write(writer, b"".join(guest.raw_records[i : i + 8]))
        assert got.wait(10), f"{len(events)} of 40 events"
    finally:
        sensor.stop()
        os.close(writer)
    assert not sensor.running and sensor.error is None
    assert [e.extra["seq"] for e in events if e.extra] == [
        r.seq for r in guest.records[:40]
    ]
