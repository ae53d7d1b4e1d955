"""kill: a process, a tree, and the processes it must refuse."""

from __future__ import annotations

import os
import subprocess
import time

import psutil
import pytest

from immune.agent.actions import ACTIONS, ActionError, Responder
from immune.agent.procfs import parse_stat_start

pytestmark = pytest.mark.usefixtures("as_root")


def _wait_children(pid: int, count: int) -> list[int]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        kids = [p.pid for p in psutil.Process(pid).children(recursive=True)]
        if len(kids) >= count:
            return kids
        time.sleep(0.02)
    raise AssertionError(f"{pid} did not start {count} children")


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_kill_a_sleep(responder: Responder) -> None:
    proc = subprocess.Popen(["sleep", "300"])
    try:
        result = await ACTIONS["kill"]({"pid": proc.pid})
        assert result["killed"] == [proc.pid]
        assert proc.wait(5) == -9
    finally:
        proc.kill()
        proc.wait()


async def test_kill_a_tree(responder: Responder) -> None:
    script = "sleep 300 & (sleep 300 & sleep 300 & wait) & wait"
    proc = subprocess.Popen(["sh", "-c", script])
    try:
        kids = _wait_children(proc.pid, 4)
        result = await ACTIONS["kill"]({"pid": proc.pid, "tree": True})
        assert set(result["killed"]) == {proc.pid, *kids}
        assert proc.wait(5) == -9
        assert all(_dead(k) for k in kids)
    finally:
        proc.kill()
        proc.wait()


async def test_kill_without_tree_leaves_children(responder: Responder) -> None:
    proc = subprocess.Popen(["sh", "-c", "sleep 300 & wait"])
    try:
        (kid,) = _wait_children(proc.pid, 1)
        await ACTIONS["kill"]({"pid": proc.pid})
        proc.wait(5)
        assert not _dead(kid)
    finally:
        proc.kill()
        proc.wait()
        os.kill(kid, 9)


async def test_kill_term_is_an_error_when_ignored(responder: Responder) -> None:
    proc = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 300 & wait"])
    try:
        _wait_children(proc.pid, 1)
        with pytest.raises(ActionError, match="still running"):
            await ACTIONS["kill"]({"pid": proc.pid, "signal": "TERM", "wait": 0.3})
        assert proc.poll() is None
    finally:
        for kid in psutil.Process(proc.pid).children(recursive=True):
            kid.kill()
        proc.kill()
        proc.wait()


def _kernel_thread() -> int:
    for p in psutil.process_iter(["ppid"]):
        if p.info["ppid"] == 2:
            return p.pid
    raise AssertionError("no kernel thread found")


@pytest.mark.parametrize(
    ("pid", "words"),
    [
        (lambda: 1, "init"),
        (lambda: os.getpid(), "agent itself"),
        (lambda: 2, "kernel thread"),
        (_kernel_thread, "kernel thread"),
        (lambda: 4_000_000, "no process"),
    ],
    ids=["init", "agent", "kthreadd", "kworker", "missing"],
)
async def test_kill_refuses(responder: Responder, pid, words: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ActionError, match=words):
        await ACTIONS["kill"]({"pid": pid()})


async def test_kill_refuses_a_tree_holding_the_agent(responder: Responder) -> None:
    parent = os.getppid()
    with pytest.raises(ActionError, match="agent"):
        await ACTIONS["kill"]({"pid": parent, "tree": True})
    assert psutil.Process(parent).status() != psutil.STATUS_STOPPED


async def test_kill_refuses_a_reused_pid(responder: Responder) -> None:
    proc = subprocess.Popen(["sleep", "300"])
    try:
        with open(f"/proc/{proc.pid}/stat", "rb") as f:
            start = parse_stat_start(f.read())
        assert start is not None
        with pytest.raises(ActionError, match="reused"):
            await ACTIONS["kill"]({"pid": proc.pid, "start": start + 1})
        assert proc.poll() is None
        await ACTIONS["kill"]({"pid": proc.pid, "start": start})
        assert proc.wait(5) == -9
    finally:
        proc.kill()
        proc.wait()
