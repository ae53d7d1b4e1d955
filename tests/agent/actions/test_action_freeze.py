"""freeze and thaw through cgroup v2, checked in /proc and cgroupfs."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from immune.agent.actions import ACTIONS, ActionError, Responder
from immune.agent.actions.cgroups import cgroup2_root

pytestmark = pytest.mark.usefixtures("as_root")


@pytest.fixture
def busy() -> Iterator[subprocess.Popen[bytes]]:
    """A process that burns CPU, so that a frozen one is seen to stop."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield proc
    proc.kill()
    proc.wait()


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def state(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("State:"):
                return line.split()[1]
    raise AssertionError("no State line")


def cgroup(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return next(line[3:].strip() for line in f if line.startswith("0::"))


def runs(pid: int) -> bool:
    before = cpu_ticks(pid)
    time.sleep(0.3)
    return cpu_ticks(pid) > before


async def test_freeze_and_thaw(
    responder: Responder, busy: subprocess.Popen[bytes]
) -> None:
    origin = cgroup(busy.pid)
    assert runs(busy.pid)

    result = await ACTIONS["freeze"]({"pid": busy.pid})
    name = f"/{responder.settings.cgroup_prefix}/freeze-{busy.pid}"
    assert result["frozen"] == [busy.pid]
    assert cgroup(busy.pid) == name
    events = (cgroup2_root() / name.lstrip("/") / "cgroup.events").read_text()
    assert "frozen 1" in events.splitlines()
    assert state(busy.pid) == "S"  # a busy loop would be R
    assert not runs(busy.pid)

    result = await ACTIONS["thaw"]({"pid": busy.pid})
    assert result["thawed"] == [busy.pid]
    assert cgroup(busy.pid) == origin
    assert runs(busy.pid)
    assert not (cgroup2_root() / name.lstrip("/")).exists()


async def test_freeze_a_tree(responder: Responder) -> None:
    code = (
        "import subprocess,sys; subprocess.run([sys.executable,'-c','while 1: pass'])"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        import psutil

        deadline = time.monotonic() + 5
        while not psutil.Process(proc.pid).children() and time.monotonic() < deadline:
            time.sleep(0.02)
        (kid,) = psutil.Process(proc.pid).children()
        result = await ACTIONS["freeze"]({"pid": proc.pid, "tree": True})
        assert set(result["frozen"]) == {proc.pid, kid.pid}
        assert not runs(kid.pid)
        await ACTIONS["thaw"]({"pid": proc.pid})
        assert runs(kid.pid)
    finally:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait()


async def test_freeze_survives_a_new_responder(
    responder: Responder, busy: subprocess.Popen[bytes]
) -> None:
    # The origin is on disk: an agent restarted in between can still thaw.
    origin = cgroup(busy.pid)
    await ACTIONS["freeze"]({"pid": busy.pid})
    again = Responder(responder.settings)
    await again.thaw({"pid": busy.pid})
    assert cgroup(busy.pid) == origin
    assert runs(busy.pid)


async def test_freeze_twice_is_refused(
    responder: Responder, busy: subprocess.Popen[bytes]
) -> None:
    await ACTIONS["freeze"]({"pid": busy.pid})
    with pytest.raises(ActionError, match="in use"):
        await ACTIONS["freeze"]({"pid": busy.pid})
    await ACTIONS["thaw"]({"pid": busy.pid})


async def test_thaw_of_a_process_not_frozen(
    responder: Responder, busy: subprocess.Popen[bytes]
) -> None:
    with pytest.raises(ActionError, match="not frozen"):
        await ACTIONS["thaw"]({"pid": busy.pid})


@pytest.mark.parametrize("pid", [1, 2])
async def test_freeze_refuses_init_and_kernel(responder: Responder, pid: int) -> None:
    with pytest.raises(ActionError, match="refused"):
        await ACTIONS["freeze"]({"pid": pid})


async def test_freeze_refuses_the_agent(responder: Responder) -> None:
    import os

    with pytest.raises(ActionError, match="agent itself"):
        await ACTIONS["freeze"]({"pid": os.getpid()})


async def test_freeze_collect_kill_thaw(
    responder: Responder, busy: subprocess.Popen[bytes]
) -> None:
    # What a responder does with a suspect: stop it, look at it, end it.
    await ACTIONS["freeze"]({"pid": busy.pid})
    evidence = await ACTIONS["collect"]({"pid": busy.pid})
    assert evidence["cmdline"][-1] == "while True: pass"
    await ACTIONS["kill"]({"pid": busy.pid})
    assert busy.wait(5) == -9
    result = await ACTIONS["thaw"]({"pid": busy.pid})
    assert result["thawed"] == []
    assert responder.cgroups.records() == {}
