"""collect: evidence of a process the test started."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from immune.agent.actions import ACTIONS, ActionError, Responder

pytestmark = pytest.mark.usefixtures("as_root")

CHILD = """
import socket, sys, time
held = open(sys.argv[1], "rb")
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
print(server.getsockname()[1], flush=True)
time.sleep(300)
"""


async def test_collect_evidence(responder: Responder, tmp_path: Path) -> None:
    evidence_file = tmp_path / "held-open.txt"
    evidence_file.write_text("x")
    env = {**os.environ, "IMMUNE_TEST_MARK": "mark-42"}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(evidence_file)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        result = await ACTIONS["collect"]({"pid": proc.pid})
    finally:
        proc.kill()
        proc.communicate()

    exe = os.path.realpath(sys.executable)
    assert result["exe"] == exe
    assert result["exe_sha256"] == hashlib.sha256(Path(exe).read_bytes()).hexdigest()
    assert result["cmdline"][-1] == str(evidence_file)
    assert result["ppid"] == os.getpid()
    assert result["environ"]["IMMUNE_TEST_MARK"] == "mark-42"
    assert any(m["path"] == exe and "x" in m["perms"] for m in result["maps"])
    assert str(evidence_file) in [f["path"] for f in result["open_files"]]
    listening = [s for s in result["sockets"] if s["state"] == "LISTEN"]
    assert [s["local"] for s in listening] == [["127.0.0.1", port]]


async def test_collect_a_missing_process(responder: Responder) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    time.sleep(0.05)
    with pytest.raises(ActionError, match="no process"):
        await ACTIONS["collect"]({"pid": proc.pid})
