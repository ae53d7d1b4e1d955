"""The eBPF sensor: record decoding on packed bytes, then the real kernel."""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sensing import EventCollector, open_or_skip

from immune.agent import ebpf, libbpf
from immune.agent.ebpf import EbpfSensor, address, split_args
from immune.agent.policy import PolicyStore, parse
from immune.agent.sensors import SensorUnavailableError
from immune.events import Event


def head(kind: int, pid: int = 10, ppid: int = 1, aux: int = 0) -> bytes:
    return ebpf.HEAD.pack(5, kind, pid, pid, ppid, 1000, 1000, 100, aux, b"cmd")


def offline() -> tuple[EbpfSensor, EventCollector]:
    collector = EventCollector()
    return EbpfSensor(agent_id="a", host="h", emit=collector), collector


# --- Decoding -------------------------------------------------------------------


def test_split_args_drops_the_final_nul() -> None:
    assert split_args(b"nc\0-e\0/bin/sh\0") == ["nc", "-e", "/bin/sh"]
    assert split_args(b"") == [""]


def test_address_of_both_families() -> None:
    assert address(2, bytes([127, 0, 0, 1]) + bytes(12)) == ("127.0.0.1", "inet")
    assert address(10, bytes(15) + b"\1") == ("::1", "inet6")


def test_exec_record_becomes_an_event_with_argv() -> None:
    sensor, collector = offline()
    body = ebpf.EXEC.pack(9, 12, 1, 0, b"/bin/true", b"true\0--help\0")
    sensor._record(head(ebpf.K_EXEC) + body)
    (event,) = collector.events
    assert (event.kind, event.pid, event.ppid, event.uid) == ("exec", 10, 1, 1000)
    assert (event.exe, event.argv, event.comm) == (
        "/bin/true",
        ["true", "--help"],
        "cmd",
    )
    assert event.extra is None


def test_exec_record_with_long_argv_is_marked_truncated() -> None:
    sensor, collector = offline()
    body = ebpf.EXEC.pack(1, 1024, 0, 0, b"x", b"a" * 1024)
    sensor._record(head(ebpf.K_EXEC) + body)
    assert collector.events[0].extra == {"truncated": "argv: first 1024 bytes"}


def test_exit_names_the_exe_seen_at_exec_and_decodes_the_status() -> None:
    sensor, collector = offline()
    sensor._record(head(ebpf.K_EXEC) + ebpf.EXEC.pack(3, 2, 1, 0, b"/x/", b"x\0"))
    sensor._record(head(ebpf.K_EXIT, aux=3 << 8) + ebpf.FORK.pack(0, 0))
    exit_event = collector.events[1]
    assert (exit_event.kind, exit_event.exit_code, exit_event.exe) == ("exit", 3, "/x/")
    assert 10 not in sensor._exes


def test_connect_record_has_address_and_port() -> None:
    sensor, collector = offline()
    body = ebpf.NET.pack(2, 4444, 7, bytes([10, 0, 0, 9]) + bytes(12))
    sensor._record(head(ebpf.K_CONNECT) + body)
    event = collector.events[0]
    assert (event.kind, event.addr, event.port, event.family) == (
        "connect",
        "10.0.0.9",
        4444,
        "inet",
    )
    assert event.extra == {"fd": 7}


def test_cred_record_reports_old_and_new_ids() -> None:
    sensor, collector = offline()
    record = bytearray(head(ebpf.K_CRED))
    struct.pack_into("=I", record, 24, 0)  # new uid
    struct.pack_into("=I", record, 28, 0)  # new euid
    body = ebpf.CRED.pack(1, 1000, 1000, 0, 0, 0, 0, 0)
    sensor._record(bytes(record) + body)
    event = collector.events[0]
    assert (event.kind, event.old_euid, event.euid) == ("setuid", 1000, 0)
    assert event.extra == {"old_uid": 1000, "call": "setuid", "ret": 0, "args": "0"}


def _free_pids(count: int) -> list[int]:
    pids = [
        pid for pid in range(3_000_000, 3_000_100) if not Path(f"/proc/{pid}").exists()
    ]
    return pids[:count]


def test_child_runs_its_parents_program_until_it_execs() -> None:
    # su's child calls setuid before it execs the shell; read later, /proc
    # would name the shell, or nothing once the child has exited.
    sensor, collector = offline()
    parent, child = _free_pids(2)
    su = b"/usr/bin/su"
    exec_body = ebpf.EXEC.pack(len(su), 3, 1, 0, su, b"su\0")
    sensor._record(head(ebpf.K_EXEC, pid=parent) + exec_body)
    sensor._record(head(ebpf.K_FORK, pid=parent) + ebpf.FORK.pack(child, 0))
    cred = ebpf.CRED.pack(1, 0, 0, 65534, 65534, 0, 0, 0)
    sensor._record(head(ebpf.K_CRED, pid=child, ppid=parent) + cred)
    kinds = {e.kind: e for e in collector.events}
    assert kinds["fork"].exe == "/usr/bin/su"
    assert kinds["setuid"].pid == child and kinds["setuid"].exe == "/usr/bin/su"


def test_short_record_is_counted_not_decoded() -> None:
    sensor, collector = offline()
    sensor._record(head(ebpf.K_EXEC) + b"\0" * 10)
    assert collector.events == []
    assert sensor.metrics.get("agent.sensor_bad_records") == 1


def test_records_lost_in_the_kernel_are_counted_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sensor, _ = offline()
    monkeypatch.setattr(sensor, "lost", lambda: 5)
    assert sensor._count_lost(0) == 5
    assert sensor._count_lost(5) == 5  # no new loss, nothing added
    assert sensor.metrics.get("agent.sensor_overruns") == 5


def test_unmounted_tracefs_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(libbpf, "TRACEFS", (Path("/nonexistent"),))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    sensor, _ = offline()
    with pytest.raises(SensorUnavailableError, match="mount -t tracefs"):
        sensor.open()


def test_missing_compiler_is_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("IMMUNE_BPF_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(libbpf.shutil, "which", lambda *a, **k: None)
    with pytest.raises(libbpf.BpfError, match="apt-get install clang"):
        libbpf.build()


# --- The real kernel ------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="eBPF needs root")


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[EbpfSensor, EventCollector]]:
    if os.geteuid() != 0:
        pytest.skip("eBPF needs root")
    collector = EventCollector()
    store = PolicyStore()
    sensor = EbpfSensor(agent_id="a", host="h", emit=collector, policy=store)
    open_or_skip(sensor)
    sensor.start()
    yield sensor, collector
    sensor.stop()


def run(argv: list[str]) -> int:
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL).wait() or 0


@pytest.mark.root
@needs_root
def test_live_exec_fork_exit_of_a_child(live, tmp_path) -> None:
    _, collector = live
    proc = subprocess.Popen(["/bin/sh", "-c", "exit 7", "immune-ebpf-test"])
    proc.wait()
    execd = collector.wait_for(lambda e: e.kind == "exec" and e.pid == proc.pid)
    assert execd.exe == "/bin/sh"
    assert execd.argv == ["/bin/sh", "-c", "exit 7", "immune-ebpf-test"]
    assert execd.ppid == os.getpid()
    fork = collector.wait_for(lambda e: e.kind == "fork" and e.pid == proc.pid)
    assert fork.ppid == os.getpid()
    gone = collector.wait_for(lambda e: e.kind == "exit" and e.pid == proc.pid)
    assert gone.exit_code == 7


@pytest.mark.root
@needs_root
def test_live_cat_shadow_is_reported_with_pid_uid_and_exe(live) -> None:
    _, collector = live
    cat = shutil.which("cat")
    proc = subprocess.Popen([cat, "/etc/shadow"], stdout=subprocess.DEVNULL)
    proc.wait()
    event = collector.wait_for(
        lambda e: e.kind == "open" and e.pid == proc.pid and e.path == "/etc/shadow"
    )
    assert event.uid == 0
    assert event.exe == os.path.realpath(cat)


@pytest.mark.root
@needs_root
def test_live_watched_files_follow_the_policy(live, tmp_path) -> None:
    sensor, collector = live
    secret = tmp_path / "secret.txt"
    secret.write_text("x")
    sensor.policy.replace(parse({"files": {"paths": [str(secret)]}}))
    try:
        proc = subprocess.Popen(["cat", str(secret)], stdout=subprocess.DEVNULL)
        proc.wait()
        collector.wait_for(lambda e: e.kind == "open" and e.path == str(secret))
    finally:
        sensor.policy.replace(parse({}))


CONNECT = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.close()
b = socket.socket()
b.bind(("127.0.0.1", 0))
print(b.getsockname()[1], flush=True)
"""


@pytest.mark.root
@needs_root
def test_live_connect_and_bind_have_address_and_port(live) -> None:
    _, collector = live
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 4444))
        listener.listen()
        proc = subprocess.Popen(
            [sys.executable, "-c", CONNECT, "4444"], stdout=subprocess.PIPE
        )
        out, _ = proc.communicate(timeout=30)
    bound = int(out)

    def is_child(e: Event) -> bool:
        return e.pid == proc.pid

    connect = collector.wait_for(
        lambda e: e.kind == "connect" and e.port == 4444 and is_child(e)
    )
    assert (connect.addr, connect.family) == ("127.0.0.1", "inet")
    assert connect.exe is not None and "python" in connect.exe
    bind = collector.wait_for(lambda e: e.kind == "bind" and is_child(e))
    assert (bind.addr, bind.port) == ("127.0.0.1", 0)
    assert bound > 0


def _have_su_and_nobody() -> bool:
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return False
    return shutil.which("su") is not None


@pytest.mark.root
@needs_root
@pytest.mark.skipif(not _have_su_and_nobody(), reason="needs su and user nobody")
def test_live_su_yields_fork_exec_and_setuid(live) -> None:
    _, collector = live
    nobody = pwd.getpwnam("nobody").pw_uid
    proc = subprocess.Popen(["su", "nobody", "-s", "/bin/sh", "-c", "true"])
    assert proc.wait() == 0
    collector.wait_for(lambda e: e.kind == "exec" and e.pid == proc.pid)
    fork = collector.wait_for(lambda e: e.kind == "fork" and e.ppid == proc.pid)
    setuid = collector.wait_for(
        lambda e: e.kind == "setuid" and e.pid == fork.pid and e.euid == nobody
    )
    assert setuid.old_euid == 0
    assert setuid.extra is not None and setuid.extra["ret"] == 0
    # su's child called setuid before it ran the shell: it was still su.
    su = os.path.realpath(shutil.which("su") or "su")
    assert fork.exe == su and setuid.exe == su
    shell = collector.wait_for(lambda e: e.kind == "exec" and e.pid == fork.pid)
    assert shell.uid == nobody


def test_refused_connect_record_is_blocked() -> None:
    sensor, collector = offline()
    body = ebpf.NET.pack(2, 4444, 3, bytes([127, 0, 0, 1]) + bytes(12))
    sensor._record(head(ebpf.K_CONNECT, aux=-1) + body)
    event = collector.events[0]
    assert (event.outcome, event.port) == ("blocked", 4444)
    assert event.extra == {"fd": 3, "error": "EPERM"}


# --- Blocking, in the real kernel, only for what the test created ------------------


@pytest.fixture
def own_cgroup() -> Iterator[Path]:
    """A cgroup v2 directory of the test's own, removed after it."""
    root = ebpf.cgroup2_root()
    if root is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    path = Path(root) / f"immune-test-{os.getpid()}-{os.urandom(3).hex()}"
    path.mkdir()
    yield path
    path.rmdir()


def blocking_sensor(
    policy: dict, **options: object
) -> tuple[EbpfSensor, EventCollector]:
    collector = EventCollector()
    store = PolicyStore()
    store.replace(parse({"files": {"paths": []}} | policy))
    sensor = EbpfSensor(agent_id="a", host="h", emit=collector, policy=store, **options)
    open_or_skip(sensor)
    return sensor, collector


@contextlib.contextmanager
def running(sensor: EbpfSensor) -> Iterator[None]:
    """Run an opened sensor for the block, and stop it after."""
    sensor.start()
    try:
        yield
    finally:
        sensor.stop()


CONNECT_ERRNO = """
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5).close()
    print(0)
except OSError as exc:
    print(exc.errno)
"""


@pytest.mark.root
@needs_root
def test_live_connect_to_a_blocked_port_is_refused_with_eperm(own_cgroup) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        sensor, collector = blocking_sensor(
            {"ports": {"mode": "block", "ports": [port]}}, cgroup=str(own_cgroup)
        )
        procs = own_cgroup / "cgroup.procs"

        def run_connect(in_cgroup: bool) -> subprocess.Popen[bytes]:
            def enter() -> None:
                if in_cgroup:
                    procs.write_text(str(os.getpid()))

            return subprocess.Popen(
                [sys.executable, "-c", CONNECT_ERRNO, str(port)],
                stdout=subprocess.PIPE,
                preexec_fn=enter,
            )

        with running(sensor):
            inside = run_connect(True)
            assert int(inside.communicate(timeout=30)[0]) == errno.EPERM
            # Outside the cgroup nothing is refused, only reported.
            outside = run_connect(False)
            assert int(outside.communicate(timeout=30)[0]) == 0
            refused = collector.wait_for(
                lambda e: e.kind == "connect" and e.pid == inside.pid
            )
            allowed = collector.wait_for(
                lambda e: e.kind == "connect" and e.pid == outside.pid
            )
    assert (refused.outcome, refused.port, refused.addr) == (
        "blocked",
        port,
        "127.0.0.1",
    )
    assert allowed.outcome == "allowed"


SETUID_ROOT = """
import errno
import os
os.setresuid(0, 65534, 0)  # drop the effective uid, keep root saved
os.seteuid(0)              # and take it back: non-root to root
print("still running as", os.geteuid(), flush=True)
"""


@pytest.mark.root
@needs_root
def test_live_setuid_to_root_is_killed_in_block_mode() -> None:
    sensor, collector = blocking_sensor(
        {"setuid": {"mode": "block"}}, block_scope_ppid=os.getpid()
    )
    with running(sensor):
        proc = subprocess.Popen(
            [sys.executable, "-c", SETUID_ROOT], stdout=subprocess.PIPE
        )
        out, _ = proc.communicate(timeout=30)
        event = collector.wait_for(
            lambda e: e.kind == "setuid" and e.pid == proc.pid and e.euid == 0
        )
    assert proc.returncode == -9 and out == b""
    assert (event.old_euid, event.outcome) == (65534, "blocked")
    assert event.extra is not None and event.extra["enforced"] == "killed"


@pytest.mark.root
@needs_root
def test_live_setuid_to_root_is_only_reported_in_audit_mode() -> None:
    sensor, collector = blocking_sensor({}, block_scope_ppid=os.getpid())
    with running(sensor):
        proc = subprocess.Popen(
            [sys.executable, "-c", SETUID_ROOT], stdout=subprocess.PIPE
        )
        out, _ = proc.communicate(timeout=30)
        event = collector.wait_for(
            lambda e: e.kind == "setuid" and e.pid == proc.pid and e.euid == 0
        )
    assert proc.returncode == 0 and out == b"still running as 0\n"
    assert event.outcome == "allowed"


@pytest.mark.root
@needs_root
def test_live_exec_by_a_relative_path_gets_the_absolute_exe(live, tmp_path) -> None:
    _, collector = live
    shutil.copy2("/bin/sleep", tmp_path / "sleepy")
    proc = subprocess.Popen(["./sleepy", "0.3"], cwd=tmp_path)
    try:
        event = collector.wait_for(lambda e: e.kind == "exec" and e.pid == proc.pid)
    finally:
        proc.wait()
    assert event.exe == str(tmp_path / "sleepy")
