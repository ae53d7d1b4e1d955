"""One agent per spool: a second one is refused with a reason, not let in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from immune.agent.spool import Spool, SpoolError


def test_spool_in_use_is_refused_until_it_is_closed(tmp_path: Path) -> None:
    path = tmp_path / "agent.spool"
    first = Spool(path, max_events=100)
    first.append([b"{}", b"{}"])
    with pytest.raises(SpoolError, match="in use by another agent"):
        Spool(path, max_events=100)
    first.close()
    again = Spool(path, max_events=100)
    assert len(again) == 2
    again.close()


def test_spool_held_by_another_process_is_refused(tmp_path: Path) -> None:
    # Two agents on one spool would count and receipt each other's events.
    path = tmp_path / "agent.spool"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from immune.agent.spool import Spool;"
            f" s = Spool({str(path)!r}, 10); print('held', flush=True);"
            " sys.stdin.readline()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(SpoolError) as info:
            Spool(path, max_events=10)
        assert str(path) in str(info.value)
        assert "[agent] spool" in str(info.value)
    finally:
        holder.communicate("\n", timeout=30)
    Spool(path, max_events=10).close()  # free once the holder has gone
