"""The audit sensor: the kernel's audit records over netlink, without auditd.

The sensor adds audit rules of its own (tagged with the key ``immune``): the
execve, connect, bind and setuid-family calls, and a read watch on each
file the policy protects. It then becomes the audit daemon (AUDIT_SET with
its pid) when no auditd is running, or joins the read-only multicast group
next to auditd when one is; either way it gets the records, which
:mod:`immune.agent.auditlog` groups into events. At close it deletes its
rules and gives back the audit state it found (enabled flag, daemon pid,
backlog limit).

Needs CAP_AUDIT_CONTROL and CAP_AUDIT_READ (root in the initial user and
pid namespaces). ``scope_ppid`` limits the rules to the children of one
process, which is what the tests use so as to watch nothing but their own.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import threading
from typing import Any

from immune.agent.auditlog import ARCH_X86_64, TYPES, Assembler, Record, parse_line
from immune.agent.policy import PolicyStore, Rules, current
from immune.agent.sensors import Sensor

logger = logging.getLogger(__name__)

NETLINK_AUDIT = 9
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
AUDIT_NLGRP_READLOG = 1
AUDIT_GET, AUDIT_SET = 1000, 1001
AUDIT_ADD_RULE, AUDIT_DEL_RULE = 1011, 1012
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
AUDIT_STATUS_ENABLED, AUDIT_STATUS_PID = 0x1, 0x4
AUDIT_STATUS_BACKLOG_LIMIT = 0x10
AUDIT_FILTER_EXIT = 0x04
AUDIT_ALWAYS = 2
AUDIT_EQUAL = 0x40000000
AUDIT_ARCH, AUDIT_PPID = 11, 18
AUDIT_WATCH, AUDIT_PERM, AUDIT_FILTERKEY = 105, 106, 210
AUDIT_PERM_READ = 4
AUDIT_BITMASK_SIZE = 64
AUDIT_MAX_FIELDS = 64
#: x86_64 numbers of the calls audited.
RULE_SYSCALLS = (59, 322, 42, 49, 105, 113, 117)
KEY = "immune"
BACKLOG = 8192
RCVBUF = 8 * 1024 * 1024

NLMSGHDR = struct.Struct("=IHHII")
STATUS = struct.Struct("=10I")


def rule(
    *,
    syscalls: tuple[int, ...] = (),
    watch: str | None = None,
    ppid: int | None = None,
    key: str = KEY,
) -> bytes:
    """A ``struct audit_rule_data`` for the exit filter, always recorded.

    Args:
        syscalls: the calls it applies to (all of them for a watch).
        watch: a path to watch for reads instead.
        ppid: only calls of the children of this process.
        key: the rule's key, found in each record it causes.
    """
    mask = [0] * AUDIT_BITMASK_SIZE
    if watch is not None:
        mask = [0xFFFFFFFF] * AUDIT_BITMASK_SIZE
    for nr in syscalls:
        mask[nr // 32] |= 1 << (nr % 32)
    fields: list[tuple[int, int]] = [(AUDIT_ARCH, ARCH_X86_64)]
    strings = b""
    if watch is not None:
        raw = watch.encode()
        fields += [(AUDIT_WATCH, len(raw)), (AUDIT_PERM, AUDIT_PERM_READ)]
        strings += raw
    if ppid is not None:
        fields.append((AUDIT_PPID, ppid))
    fields.append((AUDIT_FILTERKEY, len(key.encode())))
    strings += key.encode()
    pad = [0] * (AUDIT_MAX_FIELDS - len(fields))
    names = [f for f, _ in fields] + pad
    values = [v for _, v in fields] + pad
    ops = [AUDIT_EQUAL] * len(fields) + pad
    head = struct.pack("=III", AUDIT_FILTER_EXIT, AUDIT_ALWAYS, len(fields))
    body = struct.pack(f"={AUDIT_BITMASK_SIZE}I", *mask)
    body += struct.pack(f"={AUDIT_MAX_FIELDS * 3}I", *names, *values, *ops)
    return head + body + struct.pack("=I", len(strings)) + strings


class AuditSensor(Sensor):
    """Events from the kernel's audit stream.

    Args:
        policy: where the protected files come from.
        scope_ppid: audit only the children of this process (tests).
        key: the key of the sensor's rules; only records with it are reported.
        **common: as for :class:`~immune.agent.sensors.Sensor`.
    """

    name = "audit"

    def __init__(
        self,
        *,
        policy: PolicyStore | None = None,
        scope_ppid: int | None = None,
        key: str = KEY,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.policy = policy or current()
        self.scope_ppid = scope_ppid
        self.key = key
        self.sock: socket.socket | None = None
        self.rules: list[bytes] = []
        self.before: tuple[int, ...] | None = None
        self.daemon = False
        self.seq = 0
        self.assembler = Assembler(agent_id=self.agent_id, host=self.host)
        self._stale = threading.Event()

    def describe(self) -> str:
        how = "as the audit daemon" if self.daemon else "next to auditd (multicast)"
        return f"Linux audit over netlink, {how}"

    def open(self) -> None:
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_AUDIT)
            self.sock.bind((0, 0))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            status = self.status()
            self.before = status
            self._claim(status)
            self._sync_rules()
        except OSError as exc:
            self.close()
            if exc.errno in (errno.EPERM, errno.EACCES):
                self.unavailable(f"needs root (CAP_AUDIT_CONTROL): {exc}")
            if exc.errno == errno.ECONNREFUSED:
                self.unavailable("audit is only available in the initial namespaces")
            self.unavailable(f"netlink audit socket: {exc}")

    # --- Talking to the kernel --------------------------------------------------

    def request(self, kind: int, payload: bytes = b"") -> bytes | None:
        """Send a request and wait for its answer.

        AUDIT_GET is answered by a status message (sent by a kernel thread
        of its own, so asked without an ACK that could come first); the
        others by an ACK.

        Returns:
            The status message's payload for AUDIT_GET, else None.

        Raises:
            OSError: the kernel refused it (its errno).
        """
        assert self.sock is not None
        self.seq += 1
        flags = NLM_F_REQUEST if kind == AUDIT_GET else NLM_F_REQUEST | NLM_F_ACK
        header = NLMSGHDR.pack(NLMSGHDR.size + len(payload), kind, flags, self.seq, 0)
        self.sock.send(header + payload)
        while True:
            ready, _, _ = select.select([self.sock], [], [], 5.0)
            if not ready:
                raise OSError(errno.ETIMEDOUT, f"no answer to audit request {kind}")
            data = self.sock.recv(1 << 20)
            if self._is_record(data):
                self._record(NLMSGHDR.unpack_from(data)[1], data[NLMSGHDR.size :])
                continue
            for mtype, seq, body in messages(data):
                if seq != self.seq:
                    continue
                if mtype == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", body)[0]
                    if err:
                        raise OSError(err, os.strerror(err))
                    return None
                if mtype == kind == AUDIT_GET:
                    return body

    def status(self) -> tuple[int, ...]:
        """(mask, enabled, failure, pid, rate_limit, backlog_limit, ...)."""
        body = self.request(AUDIT_GET) or b""
        return STATUS.unpack(body[: STATUS.size].ljust(STATUS.size, b"\0"))

    def _set(self, mask: int, enabled: int, pid: int, backlog: int) -> None:
        self.request(
            AUDIT_SET, STATUS.pack(mask, enabled, 0, pid, 0, backlog, 0, 0, 0, 0)
        )

    def _claim(self, status: tuple[int, ...]) -> None:
        assert self.sock is not None
        owner, backlog = status[3], status[5]
        mask = AUDIT_STATUS_ENABLED | AUDIT_STATUS_BACKLOG_LIMIT
        if owner == 0:
            self._set(mask | AUDIT_STATUS_PID, 1, os.getpid(), max(backlog, BACKLOG))
            self.daemon = True
            return
        # auditd (or another) owns the unicast stream: listen beside it.
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, AUDIT_NLGRP_READLOG)
        self._set(AUDIT_STATUS_ENABLED, 1, 0, 0)

    def _wanted(self) -> list[bytes]:
        wanted = [rule(syscalls=RULE_SYSCALLS, ppid=self.scope_ppid, key=self.key)]
        for path in self.policy.rules.watched_files():
            if os.path.exists(path):
                wanted.append(rule(watch=path, ppid=self.scope_ppid, key=self.key))
        return wanted

    def _sync_rules(self) -> None:
        """Make the kernel's rules of this sensor those the policy wants."""
        wanted = self._wanted()
        for data in [r for r in self.rules if r not in wanted]:
            self.request(AUDIT_DEL_RULE, data)
            self.rules.remove(data)
        for data in [r for r in wanted if r not in self.rules]:
            try:
                self.request(AUDIT_ADD_RULE, data)
            except FileExistsError:
                pass  # the same rule is in force already (left by a crash)
            self.rules.append(data)

    def close(self) -> None:
        if self.sock is None:
            return
        try:
            for data in self.rules:
                self.request(AUDIT_DEL_RULE, data)
            if self.before is not None:
                _, enabled, _, _, _, backlog, *_ = self.before
                mask = AUDIT_STATUS_ENABLED | AUDIT_STATUS_BACKLOG_LIMIT
                if self.daemon:
                    self._set(mask | AUDIT_STATUS_PID, enabled, 0, backlog)
                else:
                    self._set(AUDIT_STATUS_ENABLED, enabled, 0, 0)
        except OSError as exc:
            logger.warning("Audit state not fully restored: %s.", exc)
        finally:
            self.rules = []
            self.before = None
            self.sock.close()
            self.sock = None

    # --- The loop ---------------------------------------------------------------

    @staticmethod
    def _is_record(data: bytes) -> bool:
        return len(data) >= NLMSGHDR.size and NLMSGHDR.unpack_from(data)[1] >= 1100

    def _changed(self, _rules: Rules) -> None:
        # The socket is the sensor thread's: it updates the rules itself.
        self._stale.set()

    def _run(self) -> None:
        assert self.sock is not None
        self.policy.subscribe(self._changed)
        while not self._stopping.is_set():
            if self._stale.is_set():
                self._stale.clear()
                try:
                    self._sync_rules()
                except OSError as exc:
                    logger.error("Audit rules not updated to the policy: %s.", exc)
            ready, _, _ = select.select([self.sock], [], [], 0.2)
            if not ready:
                continue
            try:
                data = self.sock.recv(1 << 20)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.metrics.inc("agent.sensor_overruns")
                    continue
                raise
            # One record a datagram, whose nlmsg_len leaves out the header
            # (an old quirk of the kernel's audit, kept for auditd): use it all.
            if self._is_record(data):
                mtype = NLMSGHDR.unpack_from(data)[1]
                self._record(mtype, data[NLMSGHDR.size :])

    def _record(self, mtype: int, body: bytes) -> None:
        name = TYPES.get(mtype)
        if name is None:
            return
        text = body.rstrip(b"\0").decode("utf-8", "backslashreplace")
        try:
            record: Record = parse_line(f"type={name} msg={text}")
        except ValueError:
            self.metrics.inc("agent.sensor_bad_records")
            return
        for event in self.assembler.add(record):
            extra = event.extra or {}
            if extra.get("key") == self.key:
                self.emit(event)


def messages(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, seq, payload) of each netlink message of a datagram."""
    found = []
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, mtype, _flags, seq, _pid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size:
            break
        found.append((mtype, seq, data[offset + NLMSGHDR.size : offset + length]))
        offset += (length + 3) & ~3
    return found
