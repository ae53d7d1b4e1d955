"""Run the ``immune`` command as a user would: its own process, no IMMUNE_ env."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_immune(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m immune ARGS`` in ``cwd``; ``env`` adds to a clean environment.

    The caller's ``IMMUNE_*`` settings are left out so that only the test's
    own apply, and tables get 300 columns so that rows do not wrap.
    """
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IMMUNE_")}
    environ.update(env or {})
    environ["COLUMNS"] = "300"
    return subprocess.run(
        [sys.executable, "-m", "immune", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
