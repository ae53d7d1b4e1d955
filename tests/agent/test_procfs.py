"""Reading /proc, the process cache, the polling sensor and sensor choice."""

from __future__ import annotations

import logging
import os
import subprocess
import time

import pytest
from sensing import EventCollector

from immune.agent import procfs, sensors
from immune.agent.procfs import (
    ProcessCache,
    ProcInfo,
    ProcPollSensor,
    parse_argv,
    parse_stat_start,
    parse_status,
    read_process,
    unescape_name,
)
from immune.agent.sensors import Sensor, SensorUnavailableError, open_first

# --- Parsers --------------------------------------------------------------------


def test_parse_status_ids() -> None:
    raw = b"Name:\tbash\nState:\tS (sleeping)\nPPid:\t7\nUid:\t1000\t0\t0\t0\n"
    info = ProcInfo(1)
    procfs.apply_status(info, parse_status(raw + b"Gid:\t10\t11\t11\t11\n"))
    assert (info.ppid, info.uid, info.euid, info.gid, info.egid) == (7, 1000, 0, 10, 11)
    assert info.comm == "bash" and not info.gone


def test_parse_status_of_a_zombie_is_gone() -> None:
    info = ProcInfo(1)
    procfs.apply_status(info, parse_status(b"State:\tZ (zombie)\n"))
    assert info.gone


def test_parse_argv_keeps_empty_and_odd_arguments() -> None:
    argv = parse_argv(b"ls\0\0-l\0caf\xc3\xa9\0\xff\0")
    assert argv == ["ls", "", "-l", "café", "\\xff"]
    assert parse_argv(b"") == []


def test_parse_argv_is_clipped_to_the_schema() -> None:
    argv = parse_argv(b"a\0" * 2000 + b"b" * 10000)
    assert len(argv) == procfs.MAX_ARGV
    assert max(map(len, parse_argv(b"b" * 10000))) == procfs.MAX_TEXT


def test_parse_stat_start_with_a_hostile_comm() -> None:
    fields = " ".join(str(n) for n in range(3, 30))
    raw = f"42 (a) b (c) {fields}".encode()
    assert parse_stat_start(raw) == 22


def test_unescape_name() -> None:
    assert unescape_name("a\\nb\\\\c") == "a\nb\\c"
    assert unescape_name("plain") == "plain"


# --- Reading a real process -----------------------------------------------------


def test_read_process_of_a_child(tmp_path) -> None:
    with subprocess.Popen(["sleep", "5"], cwd=tmp_path) as child:
        try:
            # Popen returns while the child may still be in execve.
            deadline = time.monotonic() + 5
            while (info := read_process(child.pid)).argv != ["sleep", "5"]:
                assert time.monotonic() < deadline, info
                time.sleep(0.01)
        finally:
            child.kill()
    assert info.exe is not None and info.exe.endswith("sleep")
    assert info.argv == ["sleep", "5"] and info.comm == "sleep"
    assert info.ppid == os.getpid() and info.cwd == str(tmp_path)
    assert info.euid == os.geteuid() and not info.gone


def test_read_process_of_a_reaped_process_is_gone() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    info = read_process(proc.pid)
    assert info.gone and info.exe is None and info.argv is None


def test_read_process_of_a_kernel_thread_is_not_gone() -> None:
    info = read_process(2)  # kthreadd
    assert not info.gone and info.exe is None and info.comm == "kthreadd"


# --- The cache --------------------------------------------------------------------


def test_cache_evicts_the_least_recently_used() -> None:
    cache = ProcessCache(maxsize=2)
    cache.put(ProcInfo(1))
    cache.put(ProcInfo(2))
    cache.get(1)
    cache.put(ProcInfo(3))
    assert 2 not in cache and 1 in cache and 3 in cache and len(cache) == 2


def test_cache_inherit_copies_the_parent() -> None:
    cache = ProcessCache()
    cache.put(ProcInfo(1, euid=5, comm="sh", exe="/bin/sh", extra={"k": "v"}))
    child = cache.inherit(1, 2)
    assert child is not None and (child.pid, child.ppid, child.euid) == (2, 1, 5)
    assert child.extra == {} and cache.get(1).extra == {"k": "v"}  # type: ignore[union-attr]
    assert cache.inherit(99, 100) is None


# --- The polling sensor -------------------------------------------------------


def test_poll_sensor_sees_a_child_start_and_end(tmp_path) -> None:
    collector = EventCollector()
    sensor = ProcPollSensor(
        agent_id="a1", host="h", emit=collector, interval=0.05, cache_size=100_000
    )
    with sensor, subprocess.Popen(["sleep", "2"], cwd=tmp_path) as child:
        try:
            ex = collector.wait_for(
                lambda e: e.kind == "exec" and e.pid == child.pid and e.comm == "sleep"
            )
        finally:
            child.kill()
        child.wait()
        end = collector.wait_for(lambda e: e.kind == "exit" and e.pid == child.pid)
    assert sensor.error is None
    assert ex.sensor == "proc" and ex.argv == ["sleep", "2"] and ex.ppid == os.getpid()
    assert ex.exe is not None and ex.exe.endswith("sleep") and ex.cwd == str(tmp_path)
    assert end.comm == "sleep" and end.exe == ex.exe
    # Running processes found at start are known, not reported.
    assert not any(e.pid == 1 for e in collector.events)


def test_poll_sensor_sees_an_euid_change() -> None:
    collector = EventCollector()
    sensor = ProcPollSensor(agent_id="a1", host="h", emit=collector)
    sensor.cache.put(ProcInfo(os.getppid(), euid=12345, comm=_comm(os.getppid())))
    sensor._check(os.getppid())
    [event] = collector.events
    assert (event.kind, event.old_euid, event.euid) == ("setuid", 12345, os.geteuid())


def test_poll_sensor_reports_an_exec_in_place() -> None:
    collector = EventCollector()
    sensor = ProcPollSensor(agent_id="a1", host="h", emit=collector)
    parent = os.getppid()
    start = procfs.read_start(parent)
    sensor.cache.put(ProcInfo(parent, comm="before", exe="/old/exe", start=start))
    sensor._check(parent)
    [event] = collector.events
    assert event.kind == "exec" and event.exe != "/old/exe"


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm", encoding="utf-8") as fh:
        return fh.read().rstrip("\n")


# --- Choosing a sensor --------------------------------------------------------


class Refusing(Sensor):
    name = "refusing"

    def open(self) -> None:
        self.unavailable("needs root: [Errno 1] Operation not permitted")


def test_open_first_falls_back_and_says_why(monkeypatch, caplog) -> None:
    known = {"refusing": Refusing, "proc": ProcPollSensor}
    monkeypatch.setattr(sensors, "registry", lambda: known)
    caplog.set_level(logging.INFO)
    sensor = open_first(
        ["refusing", "proc"],
        {"proc": {"interval": 0.25}},
        agent_id="a1",
        host="h",
        emit=lambda e: None,
    )
    sensor.close()
    assert sensor.name == "proc"
    assert (
        "refusing unavailable (needs root: [Errno 1] Operation not permitted); "
        "falling back to /proc polling every 0.25 s." in caplog.text
    )


def test_open_first_with_nothing_usable(monkeypatch) -> None:
    monkeypatch.setattr(sensors, "registry", lambda: {"refusing": Refusing})
    with pytest.raises(SensorUnavailableError, match="bogus: unknown sensor"):
        open_first(["refusing", "bogus"], agent_id="a1", host="h", emit=print)


class Crashing(Sensor):
    name = "crashing"

    def _run(self) -> None:
        raise RuntimeError("boom")


def test_a_dying_sensor_reports_its_error(caplog) -> None:
    errors: list[BaseException] = []
    sensor = Crashing(agent_id="a1", host="h", emit=print, on_error=errors.append)
    sensor.start()
    sensor.stop()
    assert isinstance(sensor.error, RuntimeError) and errors == [sensor.error]
    assert "Sensor crashing failed" in caplog.text


def test_poll_sensor_reports_an_empty_argv_on_second_sight(monkeypatch) -> None:
    collector = EventCollector()
    sensor = ProcPollSensor(agent_id="a1", host="h", emit=collector)
    empty = ProcInfo(4242, ppid=1, comm="pkexec", exe="/usr/bin/pkexec", argv=[])
    monkeypatch.setattr(procfs, "read_process", lambda pid: empty)
    sensor._started(4242)  # maybe caught inside execve: wait one scan
    assert collector.events == []
    sensor._started(4242)  # still empty: argc 0 is itself worth reporting
    [event] = collector.events
    assert event.kind == "exec" and event.argv == []
