"""The eBPF sensor: exec, fork, exit, connect, bind, opens and setuid calls.

The programs of ``bpf/immune.bpf.c`` run in the kernel at the scheduler's
and the system calls' tracepoints and write fixed-size records to a ring
buffer, read here with libbpf's ``ring_buffer__poll``. The kernel hands over
what a /proc reader would race for (the exec'd file name and its argv, the
parent, the credentials), so even a process that lives a microsecond is
reported whole. Opens are filtered in the kernel against the policy's
watched files, which this sensor writes into the ``watched`` and
``prefixes`` maps whenever the policy changes.

Blocking, where the policy says so: a connect to a blocked port is refused
with EPERM by ``cgroup/connect4`` and ``connect6`` programs attached to the
root of the cgroup v2 hierarchy (or to ``cgroup``); a change of effective
uid from non-root to root is answered with SIGKILL from the call's exit
tracepoint, before the process runs another instruction (a kernel without
the BPF LSM, like this one, offers no hook to refuse it outright).

Needs root (CAP_BPF and CAP_PERFMON), a kernel with BTF, tracefs mounted
(``mount -t tracefs nodev /sys/kernel/tracing``), and clang, bpftool and
libbpf-dev to build the object the first time.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import struct
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import msgspec

from immune.agent import libbpf
from immune.agent.cnproc import exit_code
from immune.agent.policy import PolicyStore, Rules, current
from immune.agent.sensors import Sensor
from immune.events import Event, new_id

logger = logging.getLogger(__name__)

PATH_LEN = 256
PREFIX_LEN = 64
PREFIXES = 8
K_EXEC, K_FORK, K_EXIT, K_CONNECT, K_BIND, K_OPEN, K_CRED = range(1, 8)
CALLS = {1: "setuid", 2: "setreuid", 3: "setresuid", 4: "setgid"}
CALLS.update({5: "setregid", 6: "setresgid"})

# These layouts mirror the structs of immune.bpf.c (explicitly padded).
HEAD = struct.Struct("=QIIIIIIIi16s")
EXEC = struct.Struct("=IIII256s1024s")
FORK = struct.Struct("=II")
NET = struct.Struct("=HHi16s")
OPEN = struct.Struct("=iI256s")
CRED = struct.Struct("=IIIIIIiI")
SIZES = {
    K_EXEC: HEAD.size + EXEC.size,
    K_FORK: HEAD.size + FORK.size,
    K_EXIT: HEAD.size + FORK.size,
    K_CONNECT: HEAD.size + NET.size,
    K_BIND: HEAD.size + NET.size,
    K_OPEN: HEAD.size + OPEN.size,
    K_CRED: HEAD.size + CRED.size,
}
#: Executables remembered per pid, so opens name the reader's executable.
EXE_CACHE = 65_536
POLL_MS = 100


class Head:
    """The fields every record starts with."""

    __slots__ = (
        "aux",
        "comm",
        "euid",
        "gid",
        "kind",
        "pid",
        "ppid",
        "tid",
        "ts",
        "uid",
    )

    def __init__(self, data: bytes, offset: int) -> None:
        ts, self.kind, self.pid, self.tid, self.ppid, *rest = HEAD.unpack_from(data)
        self.uid, self.euid, self.gid, self.aux, comm = rest
        self.ts = ts + offset
        self.comm = _text(comm)


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def split_args(raw: bytes) -> list[str]:
    """argv from the NUL-separated bytes of a process's argument area."""
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    return [arg.decode(errors="replace")[:4096] for arg in raw.split(b"\0")][:1024]


def address(family: int, raw: bytes) -> tuple[str, str]:
    """The text of an IPv4 or IPv6 address and the event's family name."""
    if family == 2:
        return str(ipaddress.IPv4Address(raw[:4])), "inet"
    return str(ipaddress.IPv6Address(raw[:16])), "inet6"


class EbpfSensor(Sensor):
    """Kernel events from IMMUNE's BPF programs.

    Args:
        policy: where the watched files come from (the agent's store).
        object_path: a compiled object to load instead of building one.
        cgroup: the cgroup v2 directory whose processes blocked ports are
            refused to (the hierarchy's root when None).
        block_scope_ppid: when set, the setuid rule kills only children of
            this process (tests).
        **common: as for :class:`~immune.agent.sensors.Sensor`.
    """

    name = "ebpf"

    def __init__(
        self,
        *,
        policy: PolicyStore | None = None,
        object_path: str | None = None,
        cgroup: str | None = None,
        block_scope_ppid: int = 0,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.policy = policy or current()
        self.object_path = object_path
        self.cgroup = cgroup
        self.block_scope_ppid = block_scope_ppid
        self._cgroup_links: list[int] = []
        self.bpf: libbpf.BpfObject | None = None
        self.ring: libbpf.RingBuffer | None = None
        self._exes: OrderedDict[int, str] = OrderedDict()
        self._ports: frozenset[int] = frozenset()
        self._watched: set[bytes] = set()
        self._offset = 0
        self._own = os.getpid()

    def describe(self) -> str:
        return "eBPF programs at tracepoints, ring buffer"

    def open(self) -> None:
        if os.geteuid() != 0:
            self.unavailable("needs root (CAP_BPF, CAP_PERFMON) to load BPF programs")
        if not libbpf.tracefs_mounted():
            self.unavailable(
                "tracefs is not mounted: mount -t tracefs nodev /sys/kernel/tracing"
            )
        try:
            path = self.object_path or str(libbpf.build())
            self.bpf = libbpf.BpfObject(Path(path))
            self.ring = libbpf.RingBuffer(self.bpf.map_fd("events"), self._record)
        except libbpf.BpfError as exc:
            self.close()
            self.unavailable(str(exc))
        self.policy.subscribe(self._watch)
        self._watch(self.policy.rules)

    def _configure(self, rules: Rules) -> None:
        assert self.bpf is not None
        block_root = rules.policy.setuid.mode == "block"
        settings = struct.pack("=IIII", self._own, 1, block_root, self.block_scope_ppid)
        self.bpf.update(self.bpf.map_fd("settings"), struct.pack("=I", 0), settings)
        fd = self.bpf.map_fd("blocked_ports")
        wanted = rules.ports if rules.policy.ports.mode == "block" else frozenset()
        for port in self._ports - wanted:
            self.bpf.delete(fd, struct.pack("=H", port))
        for port in wanted - self._ports:
            self.bpf.update(fd, struct.pack("=H", port), b"\1")
        self._ports = wanted
        if wanted and not self._cgroup_links:
            self._attach_refusals()

    def _attach_refusals(self) -> None:
        assert self.bpf is not None
        path = self.cgroup or cgroup2_root()
        if path is None:
            logger.warning("Blocked ports are not refused: no cgroup v2 mount.")
            return
        try:
            self._cgroup_links = self.bpf.attach_cgroup(path)
        except libbpf.BpfError as exc:
            logger.warning("Blocked ports are not refused: %s.", exc)

    def _watch(self, rules: Rules) -> None:
        """Write the policy's watched files, ports and settings into the maps."""
        if self.bpf is None:
            return
        self._configure(rules)
        fd = self.bpf.map_fd("watched")
        keys = {
            p.encode()[: PATH_LEN - 1].ljust(PATH_LEN, b"\0")
            for p in rules.watched_files()
        }
        for key in self._watched - keys:
            self.bpf.delete(fd, key)
        for key in keys - self._watched:
            self.bpf.update(fd, key, b"\1")
        self._watched = keys
        dirs = [d.encode() for d in rules.file_dirs if len(d.encode()) <= PREFIX_LEN]
        if len(dirs) < len(rules.file_dirs) or len(dirs) > PREFIXES:
            logger.warning(
                "eBPF watches %d directories of %d, each at most %d bytes long.",
                min(len(dirs), PREFIXES),
                len(rules.file_dirs),
                PREFIX_LEN,
            )
        fd = self.bpf.map_fd("prefixes")
        for index in range(PREFIXES):
            raw = dirs[index] if index < len(dirs) else b""
            value = struct.pack("=I", len(raw)) + raw.ljust(PREFIX_LEN, b"\0")
            self.bpf.update(fd, struct.pack("=I", index), value)

    def close(self) -> None:
        if self.ring is not None:
            self.ring.free()
            self.ring = None
        if self.bpf is not None:
            self.bpf.detach(self._cgroup_links)
            self.bpf.close()
            self.bpf = None

    def lost(self) -> int:
        """Records the kernel could not queue (ring buffer full), all CPUs."""
        if self.bpf is None:
            return 0
        fd = self.bpf.map_fd("lost")
        ncpu = os.cpu_count() or 1
        raw = self.bpf.lookup(fd, struct.pack("=I", 0), 8 * ncpu)
        return sum(struct.unpack(f"={ncpu}Q", raw)) if raw else 0

    def _run(self) -> None:
        assert self.ring is not None
        reported, last_check = 0, time.monotonic()
        while not self._stopping.is_set():
            self._offset = time.time_ns() - time.monotonic_ns()
            self.ring.poll(POLL_MS)
            if time.monotonic() - last_check >= 1.0:
                last_check = time.monotonic()
                reported = self._count_lost(reported)
        self._count_lost(reported)

    def _count_lost(self, reported: int) -> int:
        """Add the records lost since the last look to the overrun counter."""
        lost = self.lost()
        if lost > reported:
            self.metrics.inc("agent.sensor_overruns", lost - reported)
            logger.warning("eBPF ring buffer full: %d records lost so far.", lost)
        return max(lost, reported)

    # --- Records to events ----------------------------------------------------

    def _record(self, data: bytes) -> None:
        kind = struct.unpack_from("=I", data, 8)[0]
        if len(data) < SIZES.get(kind, 1 << 30):
            self.metrics.inc("agent.sensor_bad_records")
            return
        head = Head(data, self._offset)
        body = memoryview(data)[HEAD.size :]
        event = self._decode(head, bytes(body))
        if event is not None:
            self.emit(event)

    def _decode(self, head: Head, body: bytes) -> Event | None:
        if head.kind == K_EXEC:
            return self._exec(head, body)
        if head.kind in (K_FORK, K_EXIT):
            child = FORK.unpack_from(body)[0]
            if head.kind == K_EXIT:
                event = self._event(head, "exit", exit_code=exit_code(head.aux))
                self._exes.pop(head.pid, None)
                return event
            self._inherit_exe(head.pid, child)
            return self._event(head, "fork", pid=child, ppid=head.pid)
        if head.kind in (K_CONNECT, K_BIND):
            return self._net(head, body)
        if head.kind == K_OPEN:
            flags, _, path = OPEN.unpack_from(body)
            return self._event(head, "open", path=_text(path), flags=flags)
        if head.kind == K_CRED:
            return self._cred(head, body)
        return None

    def _inherit_exe(self, parent: int, child: int) -> None:
        # A child runs its parent's program until it execs: su's child calls
        # setuid before it execs the shell, and by the time its event is read
        # /proc would name the shell (or nothing, once it exited).
        exe = self._exes.get(parent) or _proc_exe(parent)
        if exe:
            self._exes[child] = exe
            if len(self._exes) > EXE_CACHE:
                self._exes.popitem(last=False)

    def _exec(self, head: Head, body: bytes) -> Event:
        name_len, args_len, full, _, name, args = EXEC.unpack_from(body)
        exe = name[:name_len].decode(errors="replace")
        if not exe.startswith("/"):
            # Run by a relative path ("./x"): the kernel's link is absolute.
            exe = _proc_exe(head.pid) or exe
        self._exes[head.pid] = exe
        if len(self._exes) > EXE_CACHE:
            self._exes.popitem(last=False)
        argv = split_args(args[:args_len])
        extra = {} if full else {"truncated": "argv: first 1024 bytes"}
        return self._event(head, "exec", exe=exe, argv=argv, **extra)

    def _net(self, head: Head, body: bytes) -> Event:
        family, port, fd, raw = NET.unpack_from(body)
        addr, fam = address(family, raw)
        kind = "connect" if head.kind == K_CONNECT else "bind"
        fields: dict[str, Any] = {"addr": addr, "port": port, "family": fam, "fd": fd}
        if head.aux < 0:
            fields["error"] = errno.errorcode.get(-head.aux, str(-head.aux))
        event = self._event(head, kind, **fields)
        if head.aux == -errno.EPERM:
            return msgspec.structs.replace(event, outcome="blocked")
        return event

    def _cred(self, head: Head, body: bytes) -> Event:
        call, old_uid, old_euid, a0, a1, a2, ret, _ = CRED.unpack_from(body)
        extra: dict[str, Any] = {"call": CALLS.get(call, str(call)), "ret": ret}
        nargs = 1 if call in (1, 4) else 2 if call in (2, 5) else 3
        ids = [a if a != 0xFFFFFFFF else -1 for a in (a0, a1, a2)[:nargs]]
        extra["args"] = ",".join(map(str, ids))
        if call >= 4:
            extra["gid"] = head.gid
        if head.aux == -errno.EPERM:
            extra["enforced"] = "killed"
        event = self._event(head, "setuid", old_euid=old_euid, old_uid=old_uid, **extra)
        if head.aux == -errno.EPERM:
            return msgspec.structs.replace(event, outcome="blocked")
        return event

    def _event(self, head: Head, kind: str, **fields: Any) -> Event:
        known = {"pid", "ppid", "exe", "argv", "addr", "port", "family", "path"}
        known |= {"exit_code", "old_euid"}
        core = {k: v for k, v in fields.items() if k in known}
        extra = {k: v for k, v in fields.items() if k not in known}
        pid = core.pop("pid", head.pid)
        core.setdefault("ppid", head.ppid)
        if kind != "exec":
            exe = self._exes.get(pid) or _proc_exe(pid)
            if exe:
                core.setdefault("exe", exe)
        return Event(
            id=new_id(),
            agent_id=self.agent_id,
            host=self.host,
            ts=head.ts,
            kind=kind,  # type: ignore[arg-type]  # one of HOST_KINDS
            pid=pid,
            uid=head.uid,
            euid=head.euid,
            comm=head.comm,
            sensor=self.name,
            extra=extra or None,
            **core,
        )


def cgroup2_root() -> str | None:
    """Where the cgroup v2 hierarchy is mounted (None if it is not)."""
    try:
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                parts = line.split()
                if len(parts) > 2 and parts[2] == "cgroup2":
                    return parts[1]
    except OSError:
        pass
    return None


def _proc_exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
