"""The kernel's own style checker finds nothing in the module's C files.

checkpatch.pl is looked for in $IMMUNE_CHECKPATCH, on PATH, in the kernel
headers' scripts, and where kernel/immune_kmod/tests/fetch-kernel.sh puts it
(extracted from Debian's linux-source-6.1).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from kmodguest import CACHE, FETCH, KMOD, unavailable


def find_checkpatch() -> Path:
    candidates = [
        os.environ.get("IMMUNE_CHECKPATCH", ""),
        shutil.which("checkpatch.pl") or "",
        *map(str, Path("/usr/src").glob("linux-headers-*/scripts/checkpatch.pl")),
        str(CACHE / "checkpatch" / "checkpatch.pl"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    unavailable(f"checkpatch.pl not found: run {FETCH}")
    raise AssertionError("unreachable")


def test_checkpatch_clean():
    if shutil.which("perl") is None:
        unavailable("perl not found: apt-get install perl")
    files = sorted(
        [*KMOD.glob("*.[ch]"), *KMOD.glob("tests/*.c"), *KMOD.glob("dragonfly/*.[ch]")]
    )
    assert len(files) >= 6
    proc = subprocess.run(
        ["perl", str(find_checkpatch()), "--no-tree", "-f",
         *map(str, files)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    totals = re.findall(r"total: (\d+) errors, (\d+) warnings", proc.stdout)
    assert len(totals) == len(files), proc.stdout + proc.stderr
    problems = [
        line
        for line in proc.stdout.splitlines()
        if line.startswith(("ERROR:", "WARNING:"))
    ]
    assert problems == [], "\n".join(problems)
    assert all(t == ("0", "0") for t in totals)
