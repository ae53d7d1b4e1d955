"""The fanotify sensor: the one that can refuse an exec or an open.

For a rule in ``block`` mode the kernel holds the process in its ``execve``
or ``open`` until this sensor answers a *permission* event (FAN_OPEN_EXEC_PERM,
FAN_OPEN_PERM) with ALLOW or DENY; a denied call fails with EPERM. For the
exec rule in ``audit`` mode the marks ask for plain notifications
(FAN_OPEN_EXEC), which hold nobody up; readers of protected files are held
in both modes, just long enough to read who they are from /proc (a
``cat`` is otherwise gone before its /proc entry can be read), then allowed.
Only events a rule matches are reported.

A process waiting on us is stuck, so every permission event is answered at
once, before the event is built, and ALLOW is the answer to anything that
goes wrong (a path that cannot be read, an exception): an error must never
lock the host. The agent's own opens are allowed without a look.

What is marked: each directory of ``exec.paths`` (with FAN_EVENT_ON_CHILD,
so the files directly in it; ``scope="mount"`` marks the directory's whole
mount instead, which also covers subdirectories but sends every exec of that
mount through here) and each file of ``files.paths`` (inode marks). Marks
follow the policy: on a change they are flushed and made again.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import struct
from typing import Any, Literal

import msgspec

from immune.agent.policy import PolicyStore, Rules, Verdict, current
from immune.agent.procfs import ProcInfo, make_event, read_process
from immune.agent.sensors import Sensor
from immune.events import Event

logger = logging.getLogger(__name__)

FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_CONTENT = 0x4
FAN_MARK_ADD = 0x1
FAN_MARK_FLUSH = 0x80
FAN_MARK_MOUNT = 0x10
FAN_OPEN = 0x20
FAN_OPEN_EXEC = 0x1000
FAN_Q_OVERFLOW = 0x4000
FAN_OPEN_PERM = 0x10000
FAN_OPEN_EXEC_PERM = 0x40000
FAN_EVENT_ON_CHILD = 0x08000000
FAN_ALLOW = 0x1
FAN_DENY = 0x2
PERM = FAN_OPEN_PERM | FAN_OPEN_EXEC_PERM
AT_FDCWD = -100
EVENT_FLAGS = os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC

METADATA = struct.Struct("=IBBHQii")  # event_len, vers, _, metadata_len, mask, fd, pid
RESPONSE = struct.Struct("=iI")
READ_SIZE = 64 * 1024
WAIT = 0.2

Scope = Literal["directory", "mount"]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_init.restype = ctypes.c_int
_libc.fanotify_mark.argtypes = [
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.c_uint64,
    ctypes.c_int,
    ctypes.c_char_p,
]
_libc.fanotify_mark.restype = ctypes.c_int


def mark(fd: int, flags: int, mask: int, path: str | None) -> None:
    """fanotify_mark(2); raises OSError with the path."""
    raw = path.encode() if path is not None else None
    if _libc.fanotify_mark(fd, flags, mask, AT_FDCWD, raw) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def parse_events(data: bytes) -> list[tuple[int, int, int]]:
    """(mask, fd, pid) of each event metadata in a read's bytes."""
    found: list[tuple[int, int, int]] = []
    offset = 0
    while offset + METADATA.size <= len(data):
        length, _vers, _, _meta_len, mask, fd, pid = METADATA.unpack_from(data, offset)
        if length < METADATA.size:
            break
        found.append((mask, fd, pid))
        offset += length
    return found


class FanotifySensor(Sensor):
    """Blocks (or reports) execs from temporary directories and protected reads.

    Args:
        policy: the rules in force (the agent's store by default).
        marks: directories to mark for execs instead of the policy's
            ``exec.paths`` (tests mark a directory of their own).
        scope: ``directory`` marks the files directly in each directory;
            ``mount`` marks each one's whole mount.
        block_only: mark only for ``block`` rules (when another sensor,
            such as eBPF, already reports the rest).
        **common: as for :class:`~immune.agent.sensors.Sensor`.
    """

    name = "fanotify"

    def __init__(
        self,
        *,
        policy: PolicyStore | None = None,
        marks: list[str] | None = None,
        scope: Scope = "directory",
        block_only: bool = False,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.policy = policy or current()
        self.marks = marks
        self.scope = scope
        self.block_only = block_only
        self.fd = -1
        self._own = os.getpid()
        self._mounts: list[str] = []
        self._wake_r, self._wake_w = -1, -1

    def describe(self) -> str:
        blocking = self._blocking(self.policy.rules)
        if self.block_only and not blocking:
            return "fanotify, idle until a rule is in block mode"
        what = "blocking" if blocking else "reporting"
        return f"fanotify permission events ({what}, {self.scope} marks)"

    def open(self) -> None:
        fd = _libc.fanotify_init(
            FAN_CLASS_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK, EVENT_FLAGS
        )
        if fd < 0:
            err = ctypes.get_errno()
            if err in (errno.EPERM, errno.EACCES):
                self.unavailable("needs root (CAP_SYS_ADMIN) for fanotify")
            self.unavailable(f"fanotify_init failed: {os.strerror(err)}")
        self.fd = fd
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            self._mark_all(self.policy.rules)
        except OSError as exc:
            self.close()
            self.unavailable(f"fanotify_mark failed: {exc}")
        self.policy.subscribe(self._remark)

    def _blocking(self, rules: Rules) -> bool:
        policy = rules.policy
        return "block" in (policy.exec.mode, policy.files.mode)

    def _mask(self, mode: str, perm: int, notify: int) -> int:
        if mode == "block":
            return perm
        return 0 if self.block_only else notify

    def _mark_all(self, rules: Rules) -> None:
        policy = rules.policy
        exec_mask = self._mask(policy.exec.mode, FAN_OPEN_EXEC_PERM, FAN_OPEN_EXEC)
        if exec_mask:
            for directory in self.marks if self.marks is not None else rules.exec_dirs:
                self._mark_dir(directory, exec_mask)
        # A reader of a protected file is held even in audit mode, for the
        # moment it takes to read its /proc entry, so it is reported whole.
        file_mask = self._mask(policy.files.mode, FAN_OPEN_PERM, FAN_OPEN_PERM)
        if file_mask:
            for path in rules.watched_files():
                self._mark_path(path, file_mask)
            for directory in rules.file_dirs:
                self._mark_path(directory, file_mask | FAN_EVENT_ON_CHILD)

    def _mark_dir(self, directory: str, mask: int) -> None:
        if self.scope == "mount":
            try:
                mark(self.fd, FAN_MARK_ADD | FAN_MARK_MOUNT, mask, directory)
                self._mounts.append(directory)
            except FileNotFoundError:
                logger.debug("Not marking %s: it does not exist.", directory)
            return
        self._mark_path(directory, mask | FAN_EVENT_ON_CHILD)

    def _mark_path(self, path: str, mask: int) -> None:
        try:
            mark(self.fd, FAN_MARK_ADD, mask, path)
        except FileNotFoundError:
            logger.debug("Not marking %s: it does not exist.", path)

    def _remark(self, rules: Rules) -> None:
        if self.fd < 0:
            return
        mark(self.fd, FAN_MARK_FLUSH, 0, None)
        if self._mounts:
            mark(self.fd, FAN_MARK_FLUSH | FAN_MARK_MOUNT, 0, None)
            self._mounts = []
        try:
            self._mark_all(rules)
        except OSError as exc:
            logger.error("fanotify marks for the new policy failed: %s.", exc)

    def _wakeup(self) -> None:
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        for fd in (self.fd, self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self.fd = self._wake_r = self._wake_w = -1

    # --- The loop ---------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            ready, _, _ = select.select([self.fd, self._wake_r], [], [], WAIT)
            if self.fd not in ready:
                continue
            try:
                data = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                continue
            for mask, fd, pid in parse_events(data):
                self._handle(mask, fd, pid)

    def _handle(self, mask: int, fd: int, pid: int) -> None:
        if mask & FAN_Q_OVERFLOW:
            self.metrics.inc("agent.sensor_overruns")
            logger.warning("fanotify queue overflowed: events were lost.")
            return
        allow = True
        try:
            event = None
            if pid != self._own:
                allow, event = self._decide(mask, fd, pid)
        except Exception:
            self.metrics.inc("agent.sensor_errors")
            logger.exception("fanotify event of pid %d failed; allowed.", pid)
            allow, event = True, None
        finally:
            if mask & PERM:
                self._respond(fd, allow)
            os.close(fd)
        if event is not None:
            if not allow:
                self.metrics.inc("agent.blocked")
            self.emit(event)

    def _respond(self, fd: int, allow: bool) -> None:
        answer = FAN_ALLOW if allow else FAN_DENY
        try:
            os.write(self.fd, RESPONSE.pack(fd, answer))
        except OSError as exc:
            logger.error("fanotify answer for fd %d failed: %s.", fd, exc)

    def _decide(self, mask: int, fd: int, pid: int) -> tuple[bool, Event | None]:
        path = os.readlink(f"/proc/self/fd/{fd}")
        rules = self.policy.rules
        execs = mask & (FAN_OPEN_EXEC | FAN_OPEN_EXEC_PERM)
        verdict = rules.exec_verdict(path) if execs else rules.file_verdict(path)
        if verdict is None:
            return True, None
        allow = not (verdict.block and mask & PERM)
        # The process waits on us while blocked: /proc still has it whole.
        info = read_process(pid)
        return allow, self._event(
            info, "exec" if execs else "open", path, verdict, allow
        )

    def _event(
        self, info: ProcInfo, kind: str, path: str, verdict: Verdict, allow: bool
    ) -> Event:
        event = make_event(
            info,
            kind,
            agent_id=self.agent_id,
            host=self.host,
            sensor=self.name,
            extra={"rule": verdict.rule, "mode": verdict.mode},
        )
        # For an exec the process is still the program that called execve.
        fields: dict[str, Any] = {"path": path, "severity": verdict.severity}
        fields["outcome"] = "allowed" if allow else "blocked"
        if kind == "exec":
            fields["extra"] = {**(event.extra or {}), "caller_exe": event.exe}
            fields["exe"] = path
            fields["argv"] = None
        return msgspec.structs.replace(event, **fields)
