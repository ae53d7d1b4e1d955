"""Fixtures of the Sigma tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from sigma_helpers import corpus_dir


@pytest.fixture(scope="session")
def corpus() -> Path:
    found = corpus_dir()
    if found is None:
        pytest.skip(
            "SigmaHQ Linux rule corpus not found: set IMMUNE_SIGMA_CORPUS to a "
            "folder of the rules, or put them in ../shared/data/sigma-linux"
        )
    return found
