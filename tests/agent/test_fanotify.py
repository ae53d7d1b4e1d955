"""The fanotify sensor against the real kernel: refusing and reporting.

Every test marks only what it created: a directory of its own under /tmp
holding a copy of /bin/true, or a file of its own; /etc/shadow only gets a
notification mark, which holds nobody up.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sensing import EventCollector

from immune.agent.fanotify import (
    FAN_OPEN_EXEC_PERM,
    METADATA,
    FanotifySensor,
    parse_events,
)
from immune.agent.policy import PolicyStore, parse

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="fanotify needs root"),
]


def test_parse_events_walks_by_event_length() -> None:
    one = METADATA.pack(24, 3, 0, 24, FAN_OPEN_EXEC_PERM, 5, 42)
    two = METADATA.pack(24, 3, 0, 24, 0x20, 6, 43)
    assert parse_events(one + two) == [(FAN_OPEN_EXEC_PERM, 5, 42), (0x20, 6, 43)]
    assert parse_events(b"\0" * 10) == []


@pytest.fixture
def exec_dir() -> Iterator[Path]:
    """A directory of the test's own under /tmp with a copy of /bin/true."""
    directory = Path(tempfile.mkdtemp(prefix="immune-fan-", dir="/tmp"))
    shutil.copy2("/bin/true", directory / "true")
    yield directory
    shutil.rmtree(directory)


def sensor_for(
    policy: dict, marks: list[str] | None = None
) -> tuple[FanotifySensor, EventCollector]:
    collector = EventCollector()
    store = PolicyStore()
    # Mark no file of the machine unless the test says so.
    store.replace(parse({"files": {"paths": []}} | policy))
    sensor = FanotifySensor(
        agent_id="a", host="h", emit=collector, policy=store, marks=marks
    )
    return sensor, collector


def test_exec_from_tmp_is_refused_with_eperm_in_block_mode(exec_dir: Path) -> None:
    policy = {"exec": {"mode": "block"}, "files": {"paths": []}}
    sensor, collector = sensor_for(policy, [str(exec_dir)])
    with sensor:
        with pytest.raises(PermissionError) as refused:
            subprocess.run([str(exec_dir / "true")], check=False)
        assert refused.value.errno == errno.EPERM
        event = collector.wait_for(lambda e: e.kind == "exec")
    assert (event.exe, event.outcome, event.severity) == (
        str(exec_dir / "true"),
        "blocked",
        "high",
    )
    assert event.extra is not None and event.extra["rule"] == "exec_path"
    assert sensor.metrics.get("agent.blocked") == 1
    # Unmarked again: the same file runs once the sensor is gone.
    assert subprocess.run([str(exec_dir / "true")], check=False).returncode == 0


def test_exec_from_tmp_is_reported_in_audit_mode(exec_dir: Path) -> None:
    policy = {"exec": {"mode": "audit"}, "files": {"paths": []}}
    sensor, collector = sensor_for(policy, [str(exec_dir)])
    with sensor:
        proc = subprocess.Popen([str(exec_dir / "true")])
        assert proc.wait() == 0
        event = collector.wait_for(lambda e: e.kind == "exec" and e.pid == proc.pid)
    assert (event.exe, event.outcome) == (str(exec_dir / "true"), "allowed")
    assert event.extra is not None and event.extra["mode"] == "audit"


def test_exec_outside_the_rules_is_allowed_silently(exec_dir: Path) -> None:
    policy = {"exec": {"mode": "block", "paths": ["/nonexistent/"]}}
    sensor, collector = sensor_for(policy | {"files": {"paths": []}}, [str(exec_dir)])
    with sensor:
        assert subprocess.run([str(exec_dir / "true")], check=False).returncode == 0
    assert collector.events == []


def test_read_of_a_protected_file_is_refused_in_block_mode(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    policy = {"files": {"mode": "block", "paths": [str(secret)]}}
    sensor, collector = sensor_for(policy, [])
    with sensor:
        cat = subprocess.run(["cat", str(secret)], capture_output=True, check=False)
        # The agent's own reads are never refused.
        assert secret.read_text() == "s3cret\n"
        event = collector.wait_for(lambda e: e.kind == "open")
    assert cat.returncode != 0
    assert b"Operation not permitted" in cat.stderr
    assert (event.path, event.outcome, event.comm) == (str(secret), "blocked", "cat")


def test_cat_shadow_is_reported_with_pid_uid_and_exe() -> None:
    policy = {"files": {"mode": "audit", "paths": ["/etc/shadow"]}}
    sensor, collector = sensor_for(policy, [])
    cat = shutil.which("cat")
    assert cat is not None
    with sensor:
        proc = subprocess.Popen([cat, "/etc/shadow"], stdout=subprocess.DEVNULL)
        assert proc.wait() == 0
        event = collector.wait_for(lambda e: e.kind == "open" and e.pid == proc.pid)
    assert (event.path, event.uid, event.outcome) == ("/etc/shadow", 0, "allowed")
    assert event.exe == os.path.realpath(cat)
    assert event.severity == "medium"


def test_marks_follow_a_policy_change(exec_dir: Path) -> None:
    sensor, collector = sensor_for({"exec": {"mode": "audit"}}, [str(exec_dir)])
    with sensor:
        assert subprocess.run([str(exec_dir / "true")], check=False).returncode == 0
        sensor.policy.replace(parse({"exec": {"mode": "block"}}))
        with pytest.raises(PermissionError):
            subprocess.run([str(exec_dir / "true")], check=False)
        sensor.policy.replace(parse({"exec": {"mode": "audit"}}))
        assert subprocess.run([str(exec_dir / "true")], check=False).returncode == 0
    outcomes = [e.outcome for e in collector.events if e.kind == "exec"]
    assert outcomes == ["allowed", "blocked", "allowed"]


def test_an_internal_error_answers_allow(
    exec_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sensor, collector = sensor_for({"exec": {"mode": "block"}}, [str(exec_dir)])

    def broken(*args: object) -> None:
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(sensor, "_decide", broken)
    with sensor:
        assert subprocess.run([str(exec_dir / "true")], check=False).returncode == 0
    assert sensor.metrics.get("agent.sensor_errors") == 1
    assert collector.events == []


@pytest.fixture
def own_mount() -> Iterator[Path]:
    """A tmpfs of the test's own under /tmp, unmounted after it."""
    directory = Path(tempfile.mkdtemp(prefix="immune-fanmnt-", dir="/tmp"))
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(directory)], check=True
    )
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)
        directory.rmdir()


def test_mount_scope_also_covers_subdirectories(own_mount: Path) -> None:
    nested = own_mount / "a" / "b"
    nested.mkdir(parents=True)
    shutil.copy2("/bin/true", nested / "true")
    shutil.copy2("/bin/true", own_mount / "true")
    collector = EventCollector()
    store = PolicyStore()
    store.replace(
        parse(
            {"exec": {"mode": "block", "paths": [str(nested)]}, "files": {"paths": []}}
        )
    )
    sensor = FanotifySensor(
        agent_id="a",
        host="h",
        emit=collector,
        policy=store,
        marks=[str(own_mount)],
        scope="mount",
    )
    with sensor:
        with pytest.raises(PermissionError):
            subprocess.run([str(nested / "true")], check=False)
        # Same mount, outside the rule's directory: allowed, not reported.
        assert subprocess.run([str(own_mount / "true")], check=False).returncode == 0
        event = collector.wait_for(lambda e: e.kind == "exec")
    assert (event.exe, event.outcome) == (str(nested / "true"), "blocked")
    assert len(collector.events) == 1
