"""IMMUNE's own cgroups (v2): where frozen and jailed processes are put.

A process to freeze or jail is moved from its cgroup to
``<root>/<prefix>/<kind>-<pid>``; where it came from is written to a record
in the state directory, so that thawing or releasing puts it back even after
the agent restarted. Freezing writes ``cgroup.freeze`` (no controller needs
enabling for that), then waits for ``cgroup.events`` to say ``frozen 1``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from pathlib import Path

from immune.agent.actions.base import ActionError

logger = logging.getLogger(__name__)

#: Where nft resolves ``socket cgroupv2`` paths from.
NFT_CGROUP_BASE = Path("/sys/fs/cgroup")


def cgroup2_root(mountinfo: str = "/proc/self/mountinfo") -> Path:
    """The mount point of the cgroup v2 hierarchy.

    Raises:
        ActionError: none is mounted (a cgroup v1 only host).
    """
    with open(mountinfo, encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[:1] == ["cgroup2"]:
                return Path(left.split()[4])
    msg = "no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup)"
    raise ActionError(msg)


def cgroup_of(pid: int) -> str:
    """The cgroup v2 path of ``pid`` (``/user.slice/...``), from /proc."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except FileNotFoundError:
        raise ActionError(f"no process {pid}") from None
    raise ActionError(f"process {pid} is in no cgroup v2")


class Cgroups:
    """IMMUNE's cgroups under one prefix, and the record of their origins.

    Args:
        prefix: IMMUNE's cgroup, one path component under the v2 root.
        state_file: JSON record ``{cgroup name: {pid: origin path}}``.
    """

    def __init__(self, prefix: str, state_file: Path) -> None:
        self.prefix = prefix
        self.state_file = state_file
        self._root: Path | None = None

    @property
    def root(self) -> Path:
        if self._root is None:
            self._root = cgroup2_root()
        return self._root

    def path(self, name: str) -> Path:
        return self.root / self.prefix / name

    def nft_path(self, name: str) -> str:
        """The cgroup's path as nft's ``socket cgroupv2`` match wants it.

        Raises:
            ActionError: the v2 hierarchy is not under /sys/fs/cgroup, where
                nft looks for it.
        """
        try:
            return str(self.path(name).relative_to(NFT_CGROUP_BASE))
        except ValueError:
            msg = f"cgroup v2 is mounted at {self.root}, not under {NFT_CGROUP_BASE}"
            raise ActionError(msg) from None

    def records(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        return dict(data)

    def _save(self, records: dict[str, dict[str, str]]) -> None:
        self.state_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(records, indent=1), encoding="utf-8")
        os.replace(tmp, self.state_file)

    def capture(self, name: str, pids: list[int]) -> dict[str, str]:
        """Move ``pids`` into the cgroup ``name``, recording where each was.

        Returns:
            ``{pid: origin}`` of the processes moved.

        Raises:
            ActionError: ``name`` holds processes already, or the kernel
                refused the move.
        """
        records = self.records()
        if name in records:
            raise ActionError(f"cgroup {self.prefix}/{name} is in use already")
        origins = {str(pid): cgroup_of(pid) for pid in pids}
        for held, origin in origins.items():
            # Moving it would undo the jail or freeze that holds it now.
            if origin.startswith(f"/{self.prefix}/"):
                msg = f"process {held} is held in {origin} already; undo that first"
                raise ActionError(msg)
        target = self.path(name)
        target.mkdir(parents=True, exist_ok=True)
        records[name] = origins
        self._save(records)
        for pid in pids:
            _move(pid, target)
        return origins

    def release(self, name: str) -> dict[str, str]:
        """Move every process of ``name`` back where it came from; remove it.

        A process whose origin is gone goes to the v2 root instead.

        Returns:
            ``{pid: cgroup it went to}``.

        Raises:
            ActionError: IMMUNE holds no such cgroup.
        """
        records = self.records()
        origins = records.get(name)
        if origins is None:
            raise ActionError(f"no process is held in {self.prefix}/{name}")
        target = self.path(name)
        moved: dict[str, str] = {}
        # A child forked inside goes where its ancestor came from.
        default = next(iter(origins.values()), "/")
        for pid in _procs(target):
            origin = origins.get(str(pid), default)
            dest = self.root / origin.lstrip("/")
            if not dest.is_dir():
                dest = self.root
            _move(pid, dest)
            moved[str(pid)] = "/" + str(dest.relative_to(self.root)).lstrip(".")
        _rmdir(target)
        del records[name]
        self._save(records)
        return moved

    def set_frozen(self, name: str, frozen: bool, timeout: float = 5.0) -> bool:
        """Freeze or thaw the cgroup ``name``; True once the kernel says so."""
        target = self.path(name)
        (target / "cgroup.freeze").write_text("1" if frozen else "0")
        want = f"frozen {int(frozen)}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if want in (target / "cgroup.events").read_text().splitlines():
                return True
            time.sleep(0.01)
        return False

    def members(self, name: str) -> list[int]:
        return _procs(self.path(name))


def _procs(path: Path) -> list[int]:
    try:
        text = (path / "cgroup.procs").read_text()
    except FileNotFoundError:
        return []
    return [int(line) for line in text.split()]


def _move(pid: int, target: Path) -> None:
    try:
        (target / "cgroup.procs").write_text(str(pid))
    except ProcessLookupError:
        logger.warning("Process %d exited before it could be moved.", pid)
    except OSError as exc:
        msg = f"cannot move process {pid} to {target}: {exc.strerror}"
        raise ActionError(msg) from exc


def _rmdir(path: Path) -> None:
    # A process that has just been moved out can keep the cgroup busy for
    # an instant while it exits; give it a moment.
    for _ in range(100):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            time.sleep(0.01)
    logger.warning("Cgroup %s stays busy; left in place.", path)
