"""The CN_PROC sensor: the decoder on packed bytes, then the real kernel."""

from __future__ import annotations

import os
import pwd
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest
from sensing import EventCollector

from immune.agent import cnproc
from immune.agent.cnproc import (
    Ack,
    CnProcSensor,
    Comm,
    Exec,
    Exit,
    Fork,
    Ids,
    Other,
    control_message,
    decode,
    exit_code,
)
from immune.agent.procfs import ProcInfo
from immune.agent.sensors import SensorUnavailableError
from immune.events import Event

TS = 123_456_789


def datagram(what: int, body: bytes, *, idx: int = 1, ack: int = 0) -> bytes:
    """One netlink message as the kernel sends it (struct proc_event padded)."""
    event = struct.pack("=IIQ", what, 0, TS) + body.ljust(24, b"\0")
    cn = struct.pack("=IIIIHH", idx, 1, 7, ack, len(event), 0)
    return struct.pack("=IHHII", 16 + len(cn) + len(event), 3, 0, 7, 0) + cn + event


# --- The decoder ---------------------------------------------------------------


def test_decode_fork() -> None:
    data = datagram(0x1, struct.pack("=4i", 10, 10, 11, 11))
    assert decode(data) == [Fork(TS, 10, 10, 11, 11)]


def test_decode_exec() -> None:
    assert decode(datagram(0x2, struct.pack("=2i", 42, 42))) == [Exec(TS, 42, 42)]


def test_decode_uid_and_gid() -> None:
    uid = datagram(0x4, struct.pack("=2i2I", 5, 5, 1000, 0))
    gid = datagram(0x40, struct.pack("=2i2I", 5, 5, 100, 101))
    assert decode(uid) == [Ids(TS, 5, 5, 1000, 0, False)]
    assert decode(gid) == [Ids(TS, 5, 5, 100, 101, True)]


def test_decode_comm() -> None:
    data = datagram(0x200, struct.pack("=2i16s", 9, 9, b"kworker/0:1"))
    assert decode(data) == [Comm(TS, 9, 9, "kworker/0:1")]


def test_decode_exit_with_parent() -> None:
    data = datagram(0x80000000, struct.pack("=2i2I2i", 8, 8, 256, 17, 1, 1))
    [event] = decode(data)
    assert event == Exit(TS, 8, 8, 256, 17, 1, 1)
    assert exit_code(event.status) == 1


def test_decode_exit_of_old_kernel_without_parent() -> None:
    # Before 4.18 the exit event ends after exit_signal.
    event = struct.pack("=IIQ", 0x80000000, 0, TS) + struct.pack("=2i2I", 8, 8, 9, 17)
    cn = struct.pack("=IIIIHH", 1, 1, 0, 0, len(event), 0)
    data = struct.pack("=IHHII", 16 + len(cn) + len(event), 3, 0, 0, 0) + cn + event
    assert decode(data) == [Exit(TS, 8, 8, 9, 17, None, None)]


def test_decode_ack() -> None:
    assert decode(datagram(0, struct.pack("=I", 0), ack=5)) == [Ack(0, 7, 5)]


def test_decode_unused_event_kept_as_other() -> None:
    assert decode(datagram(0x80, struct.pack("=2i", 3, 3))) == [Other(TS, 0x80)]


def test_decode_skips_other_connectors_and_garbage() -> None:
    assert decode(datagram(0x2, struct.pack("=2i", 1, 1), idx=4)) == []
    assert decode(b"\x01\x02") == []
    truncated = datagram(0x2, struct.pack("=2i", 1, 1))[:30]
    assert decode(truncated) == []


def test_decode_several_messages_in_one_datagram() -> None:
    data = datagram(0x2, struct.pack("=2i", 1, 1)) + datagram(
        0x2, struct.pack("=2i", 2, 2)
    )
    assert [e.pid for e in decode(data)] == [1, 2]  # type: ignore[union-attr]


def test_exit_code_of_signal_and_status() -> None:
    assert exit_code(0) == 0
    assert exit_code(3 << 8) == 3
    assert exit_code(9) == -9


def test_control_message_layout() -> None:
    data = control_message(cnproc.PROC_CN_MCAST_LISTEN, 1234, 99)
    length, kind, _, _, portid = struct.unpack_from("=IHHII", data)
    idx, val, _, ack, size, _ = struct.unpack_from("=IIIIHH", data, 16)
    assert (length, kind, portid) == (len(data), 3, 1234)
    assert (idx, val, ack, size) == (1, 1, 99, 4)
    assert struct.unpack_from("=I", data, 36) == (1,)


# --- The handlers, fed decoded messages ---------------------------------------


@pytest.fixture
def offline_sensor() -> tuple[CnProcSensor, list[Event]]:
    """A sensor that is never opened: events are fed to handle() by hand."""
    events: list[Event] = []
    sensor = CnProcSensor(agent_id="a1", host="h", emit=events.append)
    return sensor, events


def test_setuid_reports_old_euid_from_cache(offline_sensor) -> None:
    sensor, events = offline_sensor
    sensor.cache.put(ProcInfo(4000, uid=0, euid=0, comm="su", exe="/usr/bin/su"))
    sensor.handle(Ids(TS, 4000, 4000, 65534, 65534, False))
    [event] = events
    assert (event.kind, event.euid, event.old_euid, event.uid) == (
        "setuid",
        65534,
        0,
        65534,
    )
    assert event.comm == "su" and event.sensor == "cn_proc"
    assert sensor.cache.get(4000).euid == 65534  # type: ignore[union-attr]


def test_exit_carries_comm_and_exe_of_the_gone_process(offline_sensor) -> None:
    sensor, events = offline_sensor
    sensor.cache.put(ProcInfo(4001, comm="x", exe="/tmp/x"))
    sensor.handle(Exit(TS, 4001, 4001, 2 << 8, 17, 1, 1))
    [event] = events
    assert (event.kind, event.exe, event.comm, event.exit_code) == (
        "exit",
        "/tmp/x",
        "x",
        2,
    )
    assert event.extra is None  # an exit is not "gone"
    assert 4001 not in sensor.cache


def test_fork_inherits_the_parent(offline_sensor) -> None:
    sensor, events = offline_sensor
    sensor.cache.put(ProcInfo(4002, euid=5, comm="sh", exe="/bin/sh"))
    sensor.handle(Fork(TS, 4002, 4002, 4003, 4003))
    [event] = events
    assert (event.pid, event.ppid, event.exe, event.euid) == (4003, 4002, "/bin/sh", 5)


def test_threads_and_own_process_are_skipped(offline_sensor) -> None:
    sensor, events = offline_sensor
    me = os.getpid()
    sensor.handle(Fork(TS, 4002, 4002, 4005, 4002))  # a new thread
    sensor.handle(Exit(TS, 4005, 4002, 0, 0, 1, 1))  # a thread's exit
    sensor.handle(Exec(TS, me, me))
    sensor.handle(Ids(TS, me, me, 0, 0, False))
    assert events == []


def test_exec_of_a_vanished_process_is_still_emitted(offline_sensor) -> None:
    sensor, events = offline_sensor
    pid = _reaped_pid()
    sensor.cache.put(ProcInfo(pid, ppid=1, uid=0, euid=0))
    sensor.handle(Exec(TS, pid, pid))
    [event] = events
    assert event.kind == "exec" and event.pid == pid
    assert event.extra == {"enrich": "gone"}
    assert (event.ppid, event.euid, event.exe) == (1, 0, None)


def _reaped_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_event_timestamp_is_wall_clock(offline_sensor) -> None:
    sensor, events = offline_sensor
    sensor._clock_offset = time.time_ns() - time.monotonic_ns()
    sensor.cache.put(ProcInfo(4006))
    sensor.handle(Exit(time.monotonic_ns(), 4006, 4006, 0, 0, 1, 1))
    assert abs(events[0].ts - time.time_ns()) < 1_000_000_000


# --- The real kernel -----------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="CN_PROC needs root")


@pytest.fixture
def live() -> Iterator[EventCollector]:
    collector = EventCollector()
    sensor = CnProcSensor(agent_id="a1", host="h", emit=collector)
    with sensor:
        yield collector
    assert sensor.error is None


@pytest.mark.root
@needs_root
def test_live_fork_exec_exit_of_a_short_process(live: EventCollector, tmp_path) -> None:
    program = tmp_path / "true-copy"
    shutil.copy("/bin/true", program)
    argv = [str(program), "--flag", "two words"]
    # Every run yields its exec; reading a 1 ms process's exe is a race the
    # sensor wins ~98% of the time (see cnproc), so allow three runs.
    for _attempt in range(3):
        proc = subprocess.Popen(argv)
        assert proc.wait(5) == 0
        pid = proc.pid
        ex = live.wait_for(lambda e, pid=pid: e.kind == "exec" and e.pid == pid)
        if ex.exe is not None:
            break
        assert ex.extra == {"enrich": "gone"}
    assert ex.exe == str(program) and ex.argv == argv
    assert ex.ppid == os.getpid() and ex.euid == os.geteuid()
    assert ex.comm == program.name[:15] and ex.cwd == os.getcwd()
    fork = live.wait_for(lambda e: e.kind == "fork" and e.pid == proc.pid)
    assert fork.ppid == os.getpid()
    end = live.wait_for(lambda e: e.kind == "exit" and e.pid == proc.pid)
    assert end.exit_code == 0 and end.exe == str(program)
    assert fork.ts <= ex.ts <= end.ts


@pytest.mark.root
@needs_root
def test_live_exit_code_of_a_killed_process(live: EventCollector) -> None:
    proc = subprocess.Popen(["sh", "-c", "kill -TERM $$"])
    assert proc.wait(5) == -15
    end = live.wait_for(lambda e: e.kind == "exit" and e.pid == proc.pid)
    assert end.exit_code == -15


def _have_su_and_nobody() -> bool:
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return False
    return shutil.which("su") is not None


@pytest.mark.root
@needs_root
@pytest.mark.skipif(not _have_su_and_nobody(), reason="needs su and user nobody")
def test_live_setuid_of_su(live: EventCollector) -> None:
    nobody = pwd.getpwnam("nobody").pw_uid
    su = subprocess.Popen(["su", "nobody", "-s", "/bin/sh", "-c", "true"])
    assert su.wait(10) == 0
    event = live.wait_for(
        lambda e: e.kind == "setuid" and e.euid == nobody and e.old_euid == 0
    )
    assert event.uid == nobody and event.sensor == "cn_proc"


def test_unavailable_sensor_says_why(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(cnproc.socket, "socket", refuse)
    sensor = CnProcSensor(agent_id="a1", host="h", emit=lambda e: None)
    with pytest.raises(SensorUnavailableError, match="needs root"):
        sensor.open()
    sensor.close()


def test_enobufs_is_counted_and_logged(offline_sensor, caplog) -> None:
    sensor, _ = offline_sensor

    class Overrun:
        calls = 0

        def recv(self, size: int) -> bytes:
            Overrun.calls += 1
            if Overrun.calls == 1:
                raise OSError(105, "No buffer space available")
            raise BlockingIOError

    sensor._sock = Overrun()  # type: ignore[assignment]
    assert sensor._receive() == []
    sensor._sock = None
    assert sensor.metrics.get("agent.sensor_overruns") == 1
    assert "dropped process events" in caplog.text
