"""Reading /proc: process enrichment, and the polling sensor for when CN_PROC is off.

Every reader here is written for a process that may vanish between two
system calls: a missing file is an answer ("gone"), not an error. Values are
clipped to the limits of :class:`immune.events.Event` so that an agent never
produces an event the hive would refuse.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from immune.agent.sensors import Sensor
from immune.events import Event, new_id, now_ns
from immune.metrics import Metrics

logger = logging.getLogger(__name__)

PROC = "/proc"

# The limits of the event schema (see immune.events): argv items, text fields.
MAX_ARGV = 1024
MAX_TEXT = 4096
MAX_SHORT = 256

#: The kernel thread that forks every other kernel thread.
KTHREADD = 2

# errno values meaning "this process no longer exists".
_GONE = (errno.ENOENT, errno.ESRCH)


@dataclass(slots=True)
class ProcInfo:
    """What is known of one process; None where it could not be read."""

    pid: int
    ppid: int | None = None
    uid: int | None = None
    euid: int | None = None
    gid: int | None = None
    egid: int | None = None
    comm: str | None = None
    exe: str | None = None
    argv: list[str] | None = None
    cwd: str | None = None
    #: The process had exited (or was a zombie) before it could be read in full.
    gone: bool = False
    #: Start time in clock ticks since boot (``/proc/<pid>/stat`` field 22).
    start: int | None = None
    extra: dict[str, str] = field(default_factory=dict)


def _text(raw: bytes, limit: int = MAX_TEXT) -> str:
    # backslashreplace rather than surrogateescape: orjson refuses lone
    # surrogates, and an odd byte in a command line is evidence worth keeping.
    return raw.decode("utf-8", "backslashreplace")[:limit]


def _read(path: str | bytes, size: int = 65536) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def parse_status(raw: bytes) -> dict[str, str]:
    """Split ``/proc/<pid>/status`` into its ``Key: value`` lines."""
    result: dict[str, str] = {}
    for line in raw.split(b"\n"):
        key, sep, value = line.partition(b":")
        if sep:
            result[key.decode("ascii", "replace")] = _text(value.strip())
    return result


def unescape_name(name: str) -> str:
    """Undo the escaping of ``Name:`` in status (``\\n`` and ``\\\\``)."""
    if "\\" not in name:
        return name
    return name.replace("\\\\", "\0").replace("\\n", "\n").replace("\0", "\\")


def parse_argv(raw: bytes) -> list[str]:
    """Split a ``cmdline`` buffer on NUL, clipped to the event schema."""
    if not raw:
        return []
    items = raw.rstrip(b"\0").split(b"\0")
    return [_text(item) for item in items[:MAX_ARGV]]


def parse_stat_start(raw: bytes) -> int | None:
    """The start time (field 22) of ``/proc/<pid>/stat``.

    The command name (field 2) may hold spaces and parentheses, so fields are
    counted from the last closing parenthesis.
    """
    tail = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(tail[19])
    except (IndexError, ValueError):
        return None


def _ids(value: str | None) -> tuple[int | None, int | None]:
    # "Uid:\treal\teffective\tsaved\tfs"
    if not value:
        return None, None
    parts = value.split()
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None, None


def apply_status(info: ProcInfo, status: dict[str, str]) -> None:
    """Copy PPid, Uid and Gid (real and effective) from a parsed status."""
    try:
        info.ppid = int(status["PPid"])
    except (KeyError, ValueError):
        pass
    info.uid, info.euid = _ids(status.get("Uid"))
    info.gid, info.egid = _ids(status.get("Gid"))
    if info.comm is None and "Name" in status:
        info.comm = unescape_name(status["Name"])[:MAX_SHORT]
    if status.get("State", "")[:1] in ("Z", "X"):
        info.gone = True


def read_process(pid: int, *, full: bool = True) -> ProcInfo:
    """Read what /proc says about ``pid``, as fast as possible.

    Args:
        pid: a process (thread group) id.
        full: also read exe, cmdline and cwd; otherwise only status and comm.

    Returns:
        A :class:`ProcInfo`; ``gone`` is set when the process had exited
        before everything could be read. A field stays None when it could not
        be read for another reason (a permission, a kernel thread's exe).
    """
    info = ProcInfo(pid)
    base = f"{PROC}/{pid}/".encode()  # bytes paths: readlink gives raw bytes
    # exe and cmdline first: they are the first things an exiting process
    # loses (its memory map), long before its status disappears. Their
    # failure alone proves nothing (kernel threads have neither); the status
    # that follows tells whether the process is gone.
    if full:
        try:
            info.exe = _text(os.readlink(base + b"exe"))
        except OSError:
            pass
        try:
            info.argv = parse_argv(_read(base + b"cmdline", 1 << 20))
        except OSError:
            pass
    try:
        info.comm = _text(_read(base + b"comm")).rstrip("\n")[:MAX_SHORT]
        apply_status(info, parse_status(_read(base + b"status")))
    except OSError as exc:
        info.gone = exc.errno in _GONE
    if full and not info.gone:
        try:
            info.cwd = _text(os.readlink(base + b"cwd"))
        except OSError as exc:
            info.gone = exc.errno in _GONE
    # A zombie reads as an empty cmdline: that is "gone", not "no arguments".
    if info.gone and not info.argv:
        info.argv = None
    return info


def read_exe(pid: int) -> str | None:
    """Where ``/proc/<pid>/exe`` points, or None."""
    try:
        return _text(os.readlink(f"{PROC}/{pid}/exe".encode()))
    except OSError:
        return None


def read_start(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks, or None when it is gone."""
    try:
        return parse_stat_start(_read(f"{PROC}/{pid}/stat", 4096))
    except OSError:
        return None


def list_pids() -> list[int]:
    """The process (thread group) ids now in /proc."""
    return [int(name) for name in os.listdir(PROC) if name.isdigit()]


class ProcessCache:
    """The last known state of each process, bounded, least recently used out.

    Sensors use it to say what a process *was* once it is gone (exit events
    carry comm and exe) and what its euid was before a change. Not thread
    safe: one sensor thread owns it.

    Args:
        maxsize: the most processes remembered; more than any host runs.
    """

    def __init__(self, maxsize: int = 65536) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[int, ProcInfo] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, pid: int) -> bool:
        return pid in self._items

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._items))

    def get(self, pid: int) -> ProcInfo | None:
        info = self._items.get(pid)
        if info is not None:
            self._items.move_to_end(pid)
        return info

    def put(self, info: ProcInfo) -> None:
        self._items[info.pid] = info
        self._items.move_to_end(info.pid)
        while len(self._items) > self.maxsize:
            self._items.popitem(last=False)

    def pop(self, pid: int) -> ProcInfo | None:
        return self._items.pop(pid, None)

    def inherit(self, parent: int, child: int) -> ProcInfo | None:
        """Record a fork: the child starts as a copy of its parent."""
        known = self.get(parent)
        if known is None:
            return None
        info = replace(known, pid=child, ppid=parent, gone=False, extra={})
        self.put(info)
        return info

    def seed(self) -> int:
        """Remember every process now running; returns how many."""
        for pid in list_pids():
            info = read_process(pid)
            if not info.gone:
                info.start = read_start(pid)
                self.put(info)
        return len(self._items)


def make_event(
    info: ProcInfo,
    kind: str,
    *,
    agent_id: str,
    host: str,
    sensor: str,
    ts: int | None = None,
    old_euid: int | None = None,
    exit_code: int | None = None,
    extra: dict[str, str | int | None] | None = None,
) -> Event:
    """Build an :class:`Event` from what is known of a process."""
    merged: dict[str, str | int | float | bool | None] = dict(info.extra)
    if info.gone:
        merged["enrich"] = "gone"
    if extra:
        merged.update(extra)
    return Event(
        id=new_id(),
        agent_id=agent_id,
        host=host,
        ts=ts or now_ns(),
        kind=kind,  # type: ignore[arg-type]  # callers pass one of HOST_KINDS
        pid=info.pid,
        ppid=info.ppid,
        uid=info.uid,
        euid=info.euid,
        old_euid=old_euid,
        comm=info.comm,
        exe=info.exe,
        argv=info.argv,
        cwd=info.cwd,
        exit_code=exit_code,
        sensor=sensor,
        extra=merged or None,
    )


class ProcPollSensor(Sensor):
    """Polls /proc: the sensor that needs no privilege and no kernel support.

    Every ``interval`` seconds it lists /proc and reads each process's status
    (one read each): a new pid becomes an ``exec`` (a ``fork`` while it
    still runs its parent's image), a vanished one an ``exit``, a changed
    euid a ``setuid``, a changed name and exe an ``exec`` in place.
    Processes that live shorter than one interval are missed: that is the
    price of polling, and why CN_PROC comes first.

    Args:
        interval: seconds between two scans.
        cache_size: the most processes remembered.
    """

    name = "proc"

    def __init__(
        self,
        *,
        agent_id: str,
        host: str,
        emit: Callable[[Event], None],
        metrics: Metrics | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        interval: float = 0.25,
        cache_size: int = 65536,
    ) -> None:
        super().__init__(
            agent_id=agent_id, host=host, emit=emit, metrics=metrics, on_error=on_error
        )
        self.interval = interval
        self.cache = ProcessCache(cache_size)
        self._self = os.getpid()
        self._deferred: set[int] = set()

    def describe(self) -> str:
        return f"/proc polling every {self.interval:g} s"

    def open(self) -> None:
        if not os.path.isdir(f"{PROC}/self"):
            self.unavailable(f"{PROC} is not mounted")
        self.cache.seed()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.scan()
            self._stopping.wait(self.interval)

    def scan(self) -> None:
        """Compare /proc with what is known, and emit the differences."""
        now = set(list_pids())
        self._deferred &= now
        for pid in list(self.cache):
            if pid not in now:
                self._exited(pid)
        for pid in now:
            if pid != self._self:
                self._check(pid)

    def _event(self, info: ProcInfo, kind: str, **kwargs: Any) -> None:
        self.emit(
            make_event(
                info,
                kind,
                agent_id=self.agent_id,
                host=self.host,
                sensor=self.name,
                **kwargs,
            )
        )

    def _exited(self, pid: int) -> None:
        info = self.cache.pop(pid)
        if info is not None:
            info.gone = False  # an exit is expected to be gone: say nothing
            self._event(info, "exit")

    def _check(self, pid: int) -> None:
        known = self.cache.get(pid)
        if known is None:
            self._started(pid)
            return
        try:
            status = parse_status(_read(f"{PROC}/{pid}/status"))
        except OSError:
            return  # exited since the listing: the next scan reports it
        name = unescape_name(status.get("Name", ""))
        if name != known.comm:
            self._renamed(pid, known, name)
            return
        _, euid = _ids(status.get("Uid"))
        if euid is not None and euid != known.euid:
            old = known.euid
            apply_status(known, status)
            self._event(known, "setuid", old_euid=old)

    def _renamed(self, pid: int, known: ProcInfo, name: str) -> None:
        # A new name is another process on a reused pid, an exec in place, or
        # just a rename (prctl, kernel workers): the start time and the exe
        # tell them apart.
        if read_start(pid) != known.start:
            self._exited(pid)
            self._started(pid)
        elif known.exe is not None and read_exe(pid) != known.exe:
            self.cache.pop(pid)
            self._started(pid)
        else:
            known.comm = name

    def _started(self, pid: int) -> None:
        info = read_process(pid)
        if info.gone and info.comm is None:
            return  # came and went between two reads: nothing to tell
        if info.exe is not None and info.argv == [] and pid not in self._deferred:
            # Caught inside execve, arguments not yet in place: look again at
            # the next scan. Only once: an empty argv is also a known trick
            # (pkexec, CVE-2021-4034) that must be reported.
            self._deferred.add(pid)
            return
        self._deferred.discard(pid)
        info.start = read_start(pid)
        self.cache.put(info)
        self._event(info, "fork" if self._is_fork(info) else "exec")

    def _is_fork(self, info: ProcInfo) -> bool:
        # kthreadd's children never exec; a child still running its parent's
        # image has not exec'd yet (its exec shows later as a new exe).
        if info.ppid == KTHREADD:
            return True
        parent = self.cache.get(info.ppid) if info.ppid is not None else None
        return (
            parent is not None
            and info.exe is not None
            and (info.exe, info.argv) == (parent.exe, parent.argv)
        )
