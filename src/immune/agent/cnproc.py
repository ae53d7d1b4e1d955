"""The CN_PROC sensor: process events from the kernel's netlink connector.

The kernel multicasts a message on every fork, exec, exit and credential
change to the sockets that joined ``CN_IDX_PROC`` and asked to LISTEN
(root on older kernels; 6.18 accepted an unprivileged listener in the initial
namespaces, whose /proc reads of other users' processes then fail). Each
message is a ``nlmsghdr`` (16 bytes), a ``cn_msg`` (20 bytes) and a
``proc_event`` (``what``, ``cpu``, ``timestamp_ns``, then a union), as laid
out in ``include/uapi/linux/cn_proc.h``. The kernel only says *which* process
did something: the sensor reads the rest from /proc at once, on its own
thread, because a short-lived process is gone within a millisecond. When it
is gone first, the event still goes out, with ``extra={"enrich": "gone"}``.

Timestamps: ``timestamp_ns`` is the kernel's CLOCK_MONOTONIC at the event;
events carry it converted to wall-clock time with the offset between the two
clocks measured when the message is read (``time.time_ns() -
time.monotonic_ns()``), so they keep the kernel's ordering and precision.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from immune.agent.procfs import ProcessCache, ProcInfo, make_event, read_process
from immune.agent.sensors import Sensor
from immune.events import Event
from immune.metrics import Metrics

logger = logging.getLogger(__name__)

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
NLMSG_DONE = 3
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2

# enum what of struct proc_event
PROC_EVENT_NONE = 0x0
PROC_EVENT_FORK = 0x1
PROC_EVENT_EXEC = 0x2
PROC_EVENT_UID = 0x4
PROC_EVENT_GID = 0x40
PROC_EVENT_SID = 0x80
PROC_EVENT_PTRACE = 0x100
PROC_EVENT_COMM = 0x200
PROC_EVENT_COREDUMP = 0x40000000
PROC_EVENT_EXIT = 0x80000000

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
EVENT_HEAD = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
_PIDS2 = struct.Struct("=ii")
_PIDS4 = struct.Struct("=iiii")
_ID = struct.Struct("=iiII")  # pid, tgid, ruid|rgid, euid|egid
_COMM = struct.Struct("=ii16s")
_EXIT = struct.Struct("=iiII")  # pid, tgid, exit_code, exit_signal
_ACK = struct.Struct("=I")

#: Kernel buffer for the socket; a fork storm fills the default in a blink.
RCVBUF = 16 * 1024 * 1024
ACK_TIMEOUT = 1.0
NICE = -10
#: Datagrams read before handling them, so that execs are read first.
BACKLOG = 256
SO_RCVBUFFORCE = 33  # asm-generic/socket.h; the socket module lacks it


# --- Decoded messages --------------------------------------------------------


class Fork(NamedTuple):
    ts: int
    parent_pid: int
    parent_tgid: int
    child_pid: int
    child_tgid: int


class Exec(NamedTuple):
    ts: int
    pid: int
    tgid: int


class Ids(NamedTuple):
    """A change of uids (``gid`` False) or gids (``gid`` True)."""

    ts: int
    pid: int
    tgid: int
    real: int
    effective: int
    gid: bool


class Comm(NamedTuple):
    ts: int
    pid: int
    tgid: int
    comm: str


class Ptrace(NamedTuple):
    ts: int
    pid: int
    tgid: int
    tracer_pid: int
    tracer_tgid: int


class Exit(NamedTuple):
    """A task's exit; ``status`` is its wait status (``code << 8 | signal``)."""

    ts: int
    pid: int
    tgid: int
    status: int
    exit_signal: int
    parent_pid: int | None
    parent_tgid: int | None


class Ack(NamedTuple):
    """The kernel's answer to a LISTEN or IGNORE request."""

    err: int
    seq: int
    ack: int


class Other(NamedTuple):
    """An event this sensor does not use (sid, coredump, a future one)."""

    ts: int
    what: int


ProcEvent = Fork | Exec | Ids | Comm | Ptrace | Exit | Ack | Other


def _decode_event(data: bytes, seq: int, ack: int) -> ProcEvent:
    what, _cpu, ts = EVENT_HEAD.unpack_from(data)
    body = data[EVENT_HEAD.size :]
    if what == PROC_EVENT_NONE:
        return Ack(_ACK.unpack_from(body)[0], seq, ack)
    if what == PROC_EVENT_FORK:
        return Fork(ts, *_PIDS4.unpack_from(body))
    if what == PROC_EVENT_EXEC:
        return Exec(ts, *_PIDS2.unpack_from(body))
    if what in (PROC_EVENT_UID, PROC_EVENT_GID):
        pid, tgid, real, effective = _ID.unpack_from(body)
        return Ids(ts, pid, tgid, real, effective, what == PROC_EVENT_GID)
    if what == PROC_EVENT_COMM:
        pid, tgid, raw = _COMM.unpack_from(body)
        name = raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")
        return Comm(ts, pid, tgid, name)
    if what == PROC_EVENT_PTRACE:
        return Ptrace(ts, *_PIDS4.unpack_from(body))
    if what == PROC_EVENT_EXIT:
        pid, tgid, status, signal = _EXIT.unpack_from(body)
        parent: tuple[int | None, int | None] = (None, None)
        # Kernels before 4.18 stop here; later ones add the parent.
        if len(body) >= _EXIT.size + _PIDS2.size:
            parent = _PIDS2.unpack_from(body, _EXIT.size)
        return Exit(ts, pid, tgid, status, signal, *parent)
    return Other(ts, what)


def decode(datagram: bytes) -> list[ProcEvent]:
    """Decode the proc events of one netlink datagram.

    Messages that are not from the process connector, or too short to hold
    what they claim, are skipped.
    """
    events: list[ProcEvent] = []
    offset = 0
    while offset + NLMSGHDR.size <= len(datagram):
        length, _type, _flags, _seq, _pid = NLMSGHDR.unpack_from(datagram, offset)
        if length < NLMSGHDR.size or offset + length > len(datagram):
            break
        start = offset + NLMSGHDR.size
        if length >= NLMSGHDR.size + CN_MSG.size + EVENT_HEAD.size:
            idx, val, seq, ack, size, _ = CN_MSG.unpack_from(datagram, start)
            body = datagram[start + CN_MSG.size : start + CN_MSG.size + size]
            if (idx, val) == (CN_IDX_PROC, CN_VAL_PROC) and len(body) >= 24:
                try:
                    events.append(_decode_event(body, seq, ack))
                except struct.error:
                    logger.debug("Short proc event of %d bytes skipped.", len(body))
        offset += (length + 3) & ~3  # NLMSG_ALIGN
    return events


def control_message(op: int, portid: int, ack: int) -> bytes:
    """The request that starts (LISTEN) or stops (IGNORE) the event stream.

    Args:
        op: PROC_CN_MCAST_LISTEN or PROC_CN_MCAST_IGNORE.
        portid: the socket's netlink port id.
        ack: a cookie; the kernel's answer carries ``ack + 1``.
    """
    payload = _ACK.pack(op)
    cn = CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, ack, len(payload), 0)
    size = NLMSGHDR.size + len(cn) + len(payload)
    return NLMSGHDR.pack(size, NLMSG_DONE, 0, 0, portid) + cn + payload


def exit_code(status: int) -> int:
    """A wait status as Python reports it: the exit code, or -signal."""
    signal = status & 0x7F
    return -signal if signal else (status >> 8) & 0xFF


def _reason(exc: OSError) -> str:
    if exc.errno in (errno.EPERM, errno.EACCES):
        return f"needs root: {exc}"
    if exc.errno in (errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT):
        return f"kernel without the process connector: {exc}"
    return str(exc)


# --- The sensor --------------------------------------------------------------


class CnProcSensor(Sensor):
    """Process events from the netlink process connector, enriched from /proc.

    Emits ``fork``, ``exec``, ``exit`` and ``setuid`` events of processes
    (thread groups); thread creation and exit are not processes and are
    skipped, and so is anything the agent's own process does. gid, comm and
    ptrace changes update what is known of a process but are not events of
    the schema yet.

    Args:
        cache_size: the most processes remembered (for old_euid, and the
            comm and exe of an exit).
        rcvbuf: the socket's kernel buffer in bytes.
        priority: how the sensor thread wins its race with short-lived
            processes: ``"fifo"`` (real-time SCHED_FIFO priority 1, else nice
            -10), ``"nice"`` (nice -10 only) or None (as the process).
    """

    name = "cn_proc"

    def __init__(
        self,
        *,
        agent_id: str,
        host: str,
        emit: Callable[[Event], None],
        metrics: Metrics | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        cache_size: int = 65536,
        rcvbuf: int = RCVBUF,
        priority: Literal["fifo", "nice"] | None = "fifo",
    ) -> None:
        super().__init__(
            agent_id=agent_id, host=host, emit=emit, metrics=metrics, on_error=on_error
        )
        self.cache = ProcessCache(cache_size)
        self.rcvbuf = rcvbuf
        self.priority = priority
        self._sock: socket.socket | None = None
        self._wake_fd: int | None = None
        self._self = os.getpid()
        self._clock_offset = 0
        self._early: dict[int, ProcInfo] = {}
        self._handlers: dict[type, Callable[..., None]] = {
            Fork: self._fork,
            Exec: self._exec,
            Ids: self._ids,
            Comm: self._comm,
            Exit: self._exit,
        }

    def describe(self) -> str:
        return "netlink process connector"

    # Opening: join the multicast group, ask for events, wait for the ack.

    def open(self) -> None:
        try:
            sock = socket.socket(
                socket.AF_NETLINK,
                socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                NETLINK_CONNECTOR,
            )
        except OSError as exc:
            self.unavailable(_reason(exc))
        try:
            self._set_rcvbuf(sock)
            sock.bind((0, CN_IDX_PROC))
            self._listen(sock)
        except OSError as exc:
            sock.close()
            self.unavailable(_reason(exc))
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        # After LISTEN, so that no process falls between the seed and the events.
        count = self.cache.seed()
        logger.debug("CN_PROC listening; %d running processes known.", count)

    def _set_rcvbuf(self, sock: socket.socket) -> None:
        try:
            # FORCE lets root exceed net.core.rmem_max.
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)

    def _listen(self, sock: socket.socket) -> None:
        cookie = random.getrandbits(31)
        portid = sock.getsockname()[0]
        sock.send(control_message(PROC_CN_MCAST_LISTEN, portid, cookie))
        deadline = time.monotonic() + ACK_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            for event in decode(data):
                # Other listeners' acks are multicast too: ours echoes our
                # cookie plus one (the kernel overwrites seq).
                if isinstance(event, Ack) and event.ack == cookie + 1:
                    if event.err:
                        raise OSError(event.err, os.strerror(event.err))
                    sock.setblocking(False)
                    return
        msg = (
            f"no answer from the kernel within {ACK_TIMEOUT:g} s (not in the "
            "initial PID namespace?)"
        )
        raise OSError(errno.ETIMEDOUT, msg)

    def close(self) -> None:
        if self._sock is not None:
            try:
                portid = self._sock.getsockname()[0]
                self._sock.send(control_message(PROC_CN_MCAST_IGNORE, portid, 0))
            except OSError:
                pass  # the kernel stops sending to a closed socket anyway
            self._sock.close()
            self._sock = None
        if self._wake_fd is not None:
            os.close(self._wake_fd)
            self._wake_fd = None

    # The thread: wait for the socket, drain it, handle each event.

    def _wakeup(self) -> None:
        if self._wake_fd is not None:
            os.eventfd_write(self._wake_fd, 1)

    def _run(self) -> None:
        assert self._sock is not None and self._wake_fd is not None
        self._raise_priority()
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        poller.register(self._wake_fd, select.POLLIN)
        while not self._stopping.is_set():
            poller.poll()
            while not self._stopping.is_set() and (events := self._receive()):
                self._process(events)

    def _raise_priority(self) -> None:
        # The race with a short-lived process is lost while this thread waits
        # for a CPU: measured on 2 busy vCPUs, a plain thread read the exe of
        # ~93% of 1 ms processes, a nice -10 one ~95%, a SCHED_FIFO one ~99%.
        # The kernel's RT throttling still leaves 5% of a CPU to the rest in
        # an event storm. On Linux these calls on a thread id affect only it.
        tid = threading.get_native_id()
        if self.priority == "fifo":
            try:
                os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(1))
                return
            except OSError as exc:
                logger.debug("No SCHED_FIFO for the CN_PROC thread: %s", exc)
        if self.priority in ("fifo", "nice"):
            try:
                os.setpriority(os.PRIO_PROCESS, tid, NICE)
            except OSError as exc:
                logger.debug("Cannot renice the CN_PROC thread: %s", exc)

    def _receive(self) -> list[ProcEvent]:
        """Decode what the socket holds now, up to ``BACKLOG`` datagrams."""
        assert self._sock is not None
        events: list[ProcEvent] = []
        for _ in range(BACKLOG):
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self._overrun()
                continue
            events.extend(decode(data))
        self._clock_offset = time.time_ns() - time.monotonic_ns()
        return events

    def _process(self, events: list[ProcEvent]) -> None:
        # Read every new image before anything else: a short-lived process
        # loses its exe and argv within a millisecond, the rest can wait. A
        # process that execs twice in this backlog is read in turn instead.
        execs = [ev.tgid for ev in events if type(ev) is Exec]
        once = {tgid for tgid in execs if execs.count(tgid) == 1} - {self._self}
        self._early = {tgid: read_process(tgid) for tgid in once}
        for event in events:
            self.handle(event)
        self._early.clear()

    def _overrun(self) -> None:
        self.metrics.inc("agent.sensor_overruns")
        logger.warning(
            "CN_PROC overrun: the kernel dropped process events (%d overruns so "
            "far); raise rcvbuf or lower the load.",
            self.metrics.get("agent.sensor_overruns"),
        )

    def handle(self, event: ProcEvent) -> None:
        """Turn one decoded message into an event (or a cache update)."""
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(event)

    def _wall(self, ts: int) -> int:
        return ts + self._clock_offset if ts else time.time_ns()

    def _emit(self, info: ProcInfo, kind: str, ts: int, **kwargs: Any) -> None:
        self.emit(
            make_event(
                info,
                kind,
                agent_id=self.agent_id,
                host=self.host,
                sensor=self.name,
                ts=self._wall(ts),
                **kwargs,
            )
        )

    def _fork(self, ev: Fork) -> None:
        if ev.child_pid != ev.child_tgid:
            return  # a new thread, not a process
        info = self.cache.inherit(ev.parent_tgid, ev.child_tgid)
        if info is None:
            info = read_process(ev.child_tgid)
            info.ppid = ev.parent_tgid
            self.cache.put(info)
        self._emit(info, "fork", ev.ts)

    def _exec(self, ev: Exec) -> None:
        if ev.tgid == self._self:
            return
        info = self._early.pop(ev.tgid, None) or read_process(ev.tgid)
        known = self.cache.get(ev.tgid)
        if known is not None:
            # What survives an exec; exe and argv belong to the old image.
            info.ppid = info.ppid if info.ppid is not None else known.ppid
            info.uid = info.uid if info.uid is not None else known.uid
            info.euid = info.euid if info.euid is not None else known.euid
            info.cwd = info.cwd or known.cwd
        self.cache.put(info)
        self._emit(info, "exec", ev.ts)

    def _ids(self, ev: Ids) -> None:
        if ev.pid != ev.tgid or ev.tgid == self._self:
            return  # glibc changes every thread: the leader's event stands for all
        info = self.cache.get(ev.tgid)
        # Unknown so far, /proc already shows the new ids: the old euid is lost.
        old = info.euid if info is not None else None
        if info is None:
            info = read_process(ev.tgid)
            self.cache.put(info)
        if ev.gid:
            info.gid, info.egid = ev.real, ev.effective
            return
        info.uid, info.euid = ev.real, ev.effective
        self._emit(info, "setuid", ev.ts, old_euid=old)
        info.gone = False

    def _comm(self, ev: Comm) -> None:
        if ev.pid == ev.tgid and (info := self.cache.get(ev.tgid)) is not None:
            info.comm = ev.comm

    def _exit(self, ev: Exit) -> None:
        if ev.pid != ev.tgid or ev.tgid == self._self:
            return  # a thread's exit; the process goes on
        info = self.cache.pop(ev.tgid) or ProcInfo(ev.tgid)
        info.gone = False  # gone is what an exit means: nothing to flag
        if ev.parent_tgid is not None:
            info.ppid = ev.parent_tgid
        self._emit(info, "exit", ev.ts, exit_code=exit_code(ev.status))
