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
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from actionkit import Net, cleanup_cgroups, ip, make_responder, need

from immune.agent.actions import Responder, configure


@pytest.fixture
def as_root() -> None:
    need(os.geteuid() == 0, "needs root (signals, cgroups, network namespaces)")


@pytest.fixture
def nft_tools(as_root: None) -> None:
    need(
        shutil.which("nft") is not None, "needs root and nft (apt-get install nftables)"
    )
    need(shutil.which("ip") is not None, "needs root and ip (apt-get install iproute2)")


@pytest.fixture
def responder(tmp_path: Path) -> Iterator[Responder]:
    """A responder of the test's own, behind ``ACTIONS`` while the test runs."""
    mine = make_responder(tmp_path)
    previous = configure(mine)
    # Not the handler of an agent an earlier test ran: none until set.
    mine.policy_handler = None
    try:
        yield mine
    finally:
        configure(previous)
        cleanup_cgroups(mine)


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
        for name, dev, end in ((host, "veth0", 1), (peer, "veth1", 2)):
            # nodad: usable at once, not after duplicate address detection.
            addr6 = f"fd00:213:{subnet}::{end}/64"
            ip("-n", name, "-6", "addr", "add", addr6, "dev", dev, "nodad")
        ip("-n", host, "link", "set", "veth0", "up")
        ip("-n", peer, "link", "set", "veth1", "up")
        yield Net(
            host,
            peer,
            f"10.213.{subnet}.1",
            f"10.213.{subnet}.2",
            f"fd00:213:{subnet}::2",
        )
    finally:
        for name in made:
            subprocess.run(
                ["ip", "netns", "del", name], capture_output=True, timeout=30
            )
