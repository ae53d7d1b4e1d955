"""Shared by the Sigma tests: events, the project's rules, the SigmaHQ corpus.

The corpus (SigmaHQ's Linux rules, under the Detection Rule License) is
never copied into the repository. It is looked for in ``IMMUNE_SIGMA_CORPUS``,
else in ``../shared/data/sigma-linux`` beside the repository (where CI puts
it); its tests skip without it.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

from immune.events import Event

HERE = Path(__file__).resolve().parent
RULES = HERE / "rules"
BAD = HERE / "bad"
REPO = HERE.parent.parent
_ids = itertools.count(1)


def corpus_dir() -> Path | None:
    """Where the SigmaHQ Linux rules are, or None."""
    candidates = [
        os.environ.get("IMMUNE_SIGMA_CORPUS"),
        str(REPO.parent / "shared" / "data" / "sigma-linux"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate, "process_creation").is_dir():
            return Path(candidate)
    return None


def ev(kind: str = "exec", agent: str = "web-1", **fields: Any) -> Event:
    """An event with a fresh id; ``argv`` may be given as one string."""
    argv = fields.get("argv")
    if isinstance(argv, str):
        fields["argv"] = argv.split(" ")
    fields.setdefault("pid", 4000 + next(_ids))
    fields.setdefault("ts", 1_700_000_000_000_000_000 + next(_ids))
    return Event(
        id=f"e{next(_ids)}", agent_id=agent, host=f"{agent}.test", kind=kind, **fields
    )
