"""The audit sensor against the real kernel, with rules scoped to this test.

The rules only match children of the test process, and the audit state the
sensor found (enabled flag, daemon pid, backlog limit) is checked to be given
back at close.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from sensing import EventCollector, open_or_skip

from immune.agent import audit
from immune.agent.audit import AuditSensor, messages, rule
from immune.agent.policy import PolicyStore, parse


def test_rule_layout() -> None:
    data = rule(syscalls=(59, 42), ppid=77, key="k")
    flags, action, count = struct.unpack_from("=III", data)
    assert (flags, action, count) == (audit.AUDIT_FILTER_EXIT, audit.AUDIT_ALWAYS, 3)
    mask = struct.unpack_from("=64I", data, 12)
    assert mask[1] == 1 << (59 - 32) | 1 << (42 - 32) and mask[0] == 0
    fields = struct.unpack_from("=3I", data, 12 + 256)
    values = struct.unpack_from("=3I", data, 12 + 256 + 256)
    assert fields == (audit.AUDIT_ARCH, audit.AUDIT_PPID, audit.AUDIT_FILTERKEY)
    assert values == (audit.ARCH_X86_64, 77, 1)
    assert data.endswith(struct.pack("=I", 1) + b"k")


def test_messages_split_a_datagram() -> None:
    one = struct.pack("=IHHII", 20, 2, 0, 5, 0) + b"\0\0\0\0"
    two = struct.pack("=IHHII", 17, 1000, 0, 6, 0) + b"x\0\0\0"
    assert messages(one + two) == [(2, 5, b"\0\0\0\0"), (1000, 6, b"x")]


@pytest.fixture
def live() -> Iterator[tuple[AuditSensor, EventCollector]]:
    if os.geteuid() != 0:
        pytest.skip("the audit netlink socket needs root")
    collector = EventCollector()
    store = PolicyStore()
    store.replace(parse({"files": {"paths": ["/etc/shadow"]}}))
    sensor = AuditSensor(
        agent_id="a", host="h", emit=collector, policy=store, scope_ppid=os.getpid()
    )
    open_or_skip(sensor)
    before = sensor.before
    assert before is not None
    sensor.start()
    yield sensor, collector
    sensor.stop()
    probe = AuditSensor(agent_id="a", host="h", emit=collector)
    probe.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, audit.NETLINK_AUDIT)
    try:
        probe.sock.bind((0, 0))
        after = probe.status()
    finally:
        probe.sock.close()
        probe.sock = None
    # enabled, daemon pid and backlog limit as found
    assert (after[1], after[3], after[5]) == (before[1], before[3], before[5])


@pytest.mark.root
def test_live_cat_shadow_gives_exec_and_open(live) -> None:
    _, collector = live
    cat = shutil.which("cat")
    proc = subprocess.Popen([cat, "/etc/shadow"], stdout=subprocess.DEVNULL)
    assert proc.wait() == 0
    execd = collector.wait_for(lambda e: e.kind == "exec" and e.pid == proc.pid)
    assert execd.argv == [cat, "/etc/shadow"]
    assert execd.ppid == os.getpid()
    opened = collector.wait_for(lambda e: e.kind == "open" and e.pid == proc.pid)
    assert (opened.path, opened.uid, opened.exe) == (
        "/etc/shadow",
        0,
        os.path.realpath(cat),
    )
    assert opened.sensor == "audit"


@pytest.mark.root
def test_live_connect_reports_address_and_port(live) -> None:
    _, collector = live
    code = "import socket; socket.create_connection(('127.0.0.1', 4444)).close()"
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 4444))
        listener.listen()
        proc = subprocess.Popen([sys.executable, "-c", code])
        assert proc.wait() == 0
    event = collector.wait_for(lambda e: e.kind == "connect" and e.pid == proc.pid)
    assert (event.addr, event.port, event.family) == ("127.0.0.1", 4444, "inet")


@pytest.mark.root
def test_live_watches_follow_the_policy(live, tmp_path) -> None:
    sensor, collector = live
    secret = tmp_path / "secret"
    secret.write_text("x")
    sensor.policy.replace(parse({"files": {"paths": [str(secret)]}}))

    def watching() -> bool:
        return any(str(secret).encode() in data for data in sensor.rules)

    deadline = time.monotonic() + 5
    while not watching() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert watching()
    assert len(sensor.rules) == 2  # the calls, and the new file's watch only
    proc = subprocess.Popen(["cat", str(secret)], stdout=subprocess.DEVNULL)
    assert proc.wait() == 0
    opened = collector.wait_for(lambda e: e.kind == "open" and e.pid == proc.pid)
    assert opened.path == str(secret)
