"""Helpers of the response action tests: root checks, responders, namespaces."""

from __future__ import annotations

import os
import subprocess
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from immune.agent.actions import Responder, Settings
from immune.agent.actions.cgroups import cgroup2_root
from immune.agent.actions.nft import _setns

T = TypeVar("T")


def need(condition: bool, reason: str) -> None:
    """Skip (fail in CI) unless ``condition``."""
    if condition:
        return
    if os.environ.get("IMMUNE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (IMMUNE_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


def make_responder(tmp_path: Path, **settings: Any) -> Responder:
    """A responder with its own state and cgroup prefix.

    Unless the test gives a ``netns`` of its own, nft is pointed at a
    namespace that does not exist: a test can then never change the
    machine's own ruleset, even by mistake.
    """
    prefix = f"immune-test-{uuid.uuid4().hex[:12]}"
    settings.setdefault("netns", f"{prefix}-no-netns")
    return Responder(
        Settings(state_dir=tmp_path / "state", cgroup_prefix=prefix, **settings)
    )


def cleanup_cgroups(responder: Responder) -> None:
    """Remove the test's cgroups, moving any process left in one out first."""
    try:
        base = cgroup2_root() / responder.settings.cgroup_prefix
    except Exception:
        return
    if not base.is_dir():
        return
    for child in sorted(base.iterdir()):
        if not child.is_dir():
            continue
        (child / "cgroup.freeze").write_text("0")
        for pid in (child / "cgroup.procs").read_text().split():
            try:
                (cgroup2_root() / "cgroup.procs").write_text(pid)
            except ProcessLookupError:
                pass
        child.rmdir()
    base.rmdir()


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Call ``fn`` on a new thread that entered network namespace ``name``.

    A socket made there stays in that namespace whichever thread uses it.
    """
    result: list[T] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            _setns(name)
            result.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


@dataclass
class Net:
    """Two namespaces joined by a veth pair.

    ``host`` is the machine under test (actions act there), ``peer`` the
    outside world; ``peer_addr`` is the peer's address seen from the host.
    """

    host: str
    peer: str
    host_addr: str
    peer_addr: str
    peer_addr6: str
