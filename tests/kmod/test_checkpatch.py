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


def _checkpatch(files: list[Path]) -> tuple[list[str], list[str]]:
    """Run checkpatch on files; its ERROR and WARNING lines."""
    if shutil.which("perl") is None:
        unavailable("perl not found: apt-get install perl")
    proc = subprocess.run(
        ["perl", str(find_checkpatch()), "--no-tree", "-f", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    totals = re.findall(r"total: (\d+) errors, (\d+) warnings", proc.stdout)
    assert len(totals) == len(files), proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    return (
        [line for line in lines if line.startswith("ERROR:")],
        [line for line in lines if line.startswith("WARNING:")],
    )


def test_linux_module_checkpatch_clean():
    files = sorted([*KMOD.glob("*.[ch]"), *KMOD.glob("tests/*.c")])
    assert len(files) >= 7
    errors, warnings = _checkpatch(files)
    assert errors == [] and warnings == [], "\n".join(errors + warnings)


def test_dragonfly_glue_has_no_checkpatch_errors():
    # Its warnings are Linux's API advice (strscpy, kmalloc_array, negative
    # errnos) that DragonFly's kernel does not follow.
    errors, _ = _checkpatch(sorted(KMOD.glob("dragonfly/*.c")))
    assert errors == [], "\n".join(errors)
