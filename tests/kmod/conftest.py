"""Fixtures of the kernel module tests: the tools, the build, one guest boot."""

from __future__ import annotations

import pytest
from kmodguest import Built, GuestRun, KernelTools, boot, build, find_tools


@pytest.fixture(scope="session")
def kernel_tools() -> KernelTools:
    """Headers, matching kernel, QEMU and busybox (a skip, or in CI a failure)."""
    return find_tools()


@pytest.fixture(scope="session")
def built(kernel_tools: KernelTools, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The module built against the headers, and the guest's probe."""
    return build(kernel_tools, tmp_path_factory.mktemp("kmod"))


@pytest.fixture(scope="session")
def guest(
    built: Built, kernel_tools: KernelTools, tmp_path_factory: pytest.TempPathFactory
) -> GuestRun:
    """One boot of the Debian kernel with the module: everything it printed."""
    return boot(built, kernel_tools, tmp_path_factory.mktemp("guest"))
