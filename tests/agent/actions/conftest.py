"""Fixtures of the response action tests.

Every test acts only on what it made: processes it started, files in its
tmp_path, a cgroup prefix of its own (``immune-test-<hex>``) and network
namespaces of its own (``ip netns add immune-test-<hex>``), removed after.
Tests that need root skip without it, and fail instead in CI
(``IMMUNE_REQUIRE_SERVICES=1``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from immune.agent.actions import Responder, Settings, configure
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


@pytest.fixture
def as_root() -> None:
    need(os.geteuid() == 0, "needs root (signals, cgroups, network namespaces)")


@pytest.fixture
def nft_tools(as_root: None) -> None:
    need(
        shutil.which("nft") is not None, "needs root and nft (apt-get install nftables)"
    )
    need(shutil.which("ip") is not None, "needs root and ip (apt-get install iproute2)")


def make_responder(tmp_path: Path, **settings: Any) -> Responder:
    prefix = f"immune-test-{uuid.uuid4().hex[:12]}"
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


@pytest.fixture
def responder(tmp_path: Path) -> Iterator[Responder]:
    """A responder of the test's own, behind ``ACTIONS`` while the test runs."""
    mine = make_responder(tmp_path)
    previous = configure(mine)
    try:
        yield mine
    finally:
        configure(previous)
        cleanup_cgroups(mine)


# --------------------------------------------------------------------------
# Network namespaces
# --------------------------------------------------------------------------


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


@pytest.fixture
def net(nft_tools: None) -> Iterator[Net]:
    tag = uuid.uuid4().hex[:8]
    host, peer = f"immune-test-{tag}h", f"immune-test-{tag}p"
    subnet = int(tag[:2], 16) % 250 + 1
    made: list[str] = []
    try:
        for name in (host, peer):
            ip("netns", "add", name)
            made.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        ip(
            "-n",
            host,
            "link",
            "add",
            "veth0",
            "type",
            "veth",
            "peer",
            "name",
            "veth1",
            "netns",
            peer,
        )
        ip("-n", host, "addr", "add", f"10.213.{subnet}.1/24", "dev", "veth0")
        ip("-n", peer, "addr", "add", f"10.213.{subnet}.2/24", "dev", "veth1")
        ip("-n", host, "link", "set", "veth0", "up")
        ip("-n", peer, "link", "set", "veth1", "up")
        yield Net(host, peer, f"10.213.{subnet}.1", f"10.213.{subnet}.2")
    finally:
        for name in made:
            subprocess.run(
                ["ip", "netns", "del", name], capture_output=True, timeout=30
            )
