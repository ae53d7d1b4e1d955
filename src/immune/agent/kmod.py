"""The kmod sensor: records of IMMUNE's kernel module, read from /dev/immune.

The module (``kernel/immune_kmod/``) hooks exec, fork, connect, bind, open
and setuid in the kernel and queues one fixed-size record of
:data:`RECORD_SIZE` bytes for each; every ``read(2)`` of ``/dev/immune``
returns whole records. Its tunables and lists are files under
``/sys/class/misc/immune/``. The layout is documented in
``kernel/immune_kmod/README.md`` and mirrored by :data:`RECORD` here.

This sensor decodes the records into :class:`~immune.events.Event` objects
and, when given a policy, writes it into the module's tunables before it
starts reading (:func:`apply_policy`).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import select
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import msgspec

from immune.agent.sensors import Sensor
from immune.errors import ImmuneError
from immune.events import SEVERITIES, Event, new_id
from immune.metrics import Metrics

logger = logging.getLogger(__name__)

DEVICE = "/dev/immune"
SYSFS = "/sys/class/misc/immune"

RECORD_VERSION = 1
RECORD_SIZE = 512
#: struct immune_record of immune_uapi.h, in the machine's byte order.
RECORD = struct.Struct("=QQHBBIIIIIHHHBx16s16s256s176s")
assert RECORD.size == RECORD_SIZE

KINDS = {1: "exec", 2: "fork", 3: "connect", 4: "bind", 5: "open", 6: "setuid"}
REASONS = {
    0x0001: "exec_dir",
    0x0002: "pattern",
    0x0004: "port",
    0x0008: "file",
    0x0010: "privileged_port",
    0x0020: "to_root",
}
OUTCOMES = {0: "allowed", 1: "blocked"}
AF_INET = 2
AF_INET6 = 10

#: Records read at most per read(2).
READ_BATCH = 64
#: Limits of the module's lists (immune_policy.h).
MAX_ITEMS = 32
ITEM_LEN = 120
MAX_PORTS = 32


class KmodError(ImmuneError):
    """A record or a policy the kernel module cannot take."""


class Record(NamedTuple):
    """One decoded ``struct immune_record``."""

    ts_ns: int
    seq: int
    kind: str
    severity: str
    outcome: str
    pid: int
    ppid: int
    uid: int
    euid: int
    value: int
    port: int
    family: int
    reasons: tuple[str, ...]
    addr: str | None
    comm: str
    path: str
    cmdline: str


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def _addr(family: int, raw: bytes) -> str | None:
    if family == AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    if family == AF_INET6:
        return str(ipaddress.IPv6Address(raw))
    return None


def decode_record(raw: bytes) -> Record:
    """Decode one record of :data:`RECORD_SIZE` bytes.

    Raises:
        KmodError: wrong size, version, kind, severity or outcome; the
            message names the field and the value.
    """
    if len(raw) != RECORD_SIZE:
        msg = f"a kmod record is {RECORD_SIZE} bytes, got {len(raw)}"
        raise KmodError(msg)
    (ts, seq, kind, sev, outcome, pid, ppid, uid, euid, value, port, family,
     reason, version, addr, comm, path, cmdline) = RECORD.unpack(raw)  # fmt: skip
    if version != RECORD_VERSION:
        msg = (
            f"kmod record {seq}: version {version}, this agent reads "
            f"version {RECORD_VERSION} (rebuild the module or upgrade the agent)"
        )
        raise KmodError(msg)
    if kind not in KINDS:
        raise KmodError(f"kmod record {seq}: unknown kind {kind}")
    if sev >= len(SEVERITIES):
        raise KmodError(f"kmod record {seq}: unknown severity {sev}")
    if outcome not in OUTCOMES:
        raise KmodError(f"kmod record {seq}: unknown outcome {outcome}")
    return Record(
        ts_ns=ts,
        seq=seq,
        kind=KINDS[kind],
        severity=SEVERITIES[sev],
        outcome=OUTCOMES[outcome],
        pid=pid,
        ppid=ppid,
        uid=uid,
        euid=euid,
        value=value,
        port=port,
        family=family,
        reasons=tuple(name for bit, name in REASONS.items() if reason & bit),
        addr=_addr(family, addr),
        comm=_text(comm),
        path=_text(path),
        cmdline=_text(cmdline),
    )


def decode_records(data: bytes) -> list[Record]:
    """Decode what one read of the device returned (whole records).

    Raises:
        KmodError: the length is not a multiple of :data:`RECORD_SIZE`, or a
            record is bad (see :func:`decode_record`).
    """
    if len(data) % RECORD_SIZE:
        msg = f"{len(data)} bytes is not a whole number of {RECORD_SIZE}-byte records"
        raise KmodError(msg)
    return [
        decode_record(data[i : i + RECORD_SIZE])
        for i in range(0, len(data), RECORD_SIZE)
    ]


def to_event(rec: Record, *, agent_id: str, host: str) -> Event:
    """The :class:`Event` of a record.

    A fork is reported as the child (``pid``) of its parent (``ppid``), as
    the other sensors do; a setuid carries the euid before (``old_euid``)
    and after (``euid``); an exec's command line is the module's argv joined
    by spaces, split back on spaces.
    """
    extra: dict[str, str | int | float | bool | None] = {"seq": rec.seq}
    if rec.reasons:
        extra["reasons"] = ",".join(rec.reasons)
    fields: dict[str, Any] = {
        "pid": rec.pid,
        "ppid": rec.ppid,
        "uid": rec.uid,
        "euid": rec.euid,
        "comm": rec.comm or None,
    }
    if rec.kind == "exec":
        fields["exe"] = rec.path or None
        fields["argv"] = rec.cmdline.split(" ") if rec.cmdline else None
    elif rec.kind == "fork":
        fields["pid"], fields["ppid"] = rec.value, rec.pid
    elif rec.kind == "setuid":
        fields["old_euid"], fields["euid"] = rec.euid, rec.value
    elif rec.kind == "open":
        fields["path"] = rec.path or None
        extra["flags"] = rec.value
    elif rec.kind in ("connect", "bind"):
        fields["addr"] = rec.addr
        fields["port"] = rec.port
        fields["family"] = "inet6" if rec.family == AF_INET6 else "inet"
    return Event(
        id=new_id(),
        agent_id=agent_id,
        host=host,
        ts=rec.ts_ns or 1,
        kind=rec.kind,  # type: ignore[arg-type]  # one of KINDS' values
        outcome=rec.outcome,  # type: ignore[arg-type]  # one of OUTCOMES'
        severity=rec.severity,  # type: ignore[arg-type]  # one of SEVERITIES
        sensor="kmod",
        extra=extra,
        **fields,
    )


# --- Policy: the module's tunables --------------------------------------------


Item = Annotated[str, msgspec.Meta(min_length=1, max_length=ITEM_LEN - 1)]
ItemList = Annotated[list[Item], msgspec.Meta(max_length=MAX_ITEMS)]
PortList = Annotated[
    list[Annotated[int, msgspec.Meta(ge=1, le=65535)]],
    msgspec.Meta(max_length=MAX_PORTS),
]


class KmodPolicy(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What the agent asks of the module; a list left None is not changed."""

    enabled: bool = True
    block_mode: bool = False
    monitor_network: bool = True
    monitor_files: bool = True
    monitor_credentials: bool = True
    log_level: Annotated[int, msgspec.Meta(ge=0, le=2)] = 1
    exec_dirs: ItemList | None = None
    patterns: ItemList | None = None
    files: ItemList | None = None
    ports: PortList | None = None


def parse_policy(obj: Any) -> KmodPolicy:
    """Validate a policy (a dict, e.g. from the hive's ``policy`` command).

    Raises:
        KmodError: naming the field at fault.
    """
    try:
        policy = msgspec.convert(obj, KmodPolicy)
    except msgspec.ValidationError as exc:
        raise KmodError(f"bad kmod policy: {exc}") from None
    for name in ("exec_dirs", "patterns", "files"):
        for item in getattr(policy, name) or ():
            if "\n" in item or "\0" in item or len(item.encode()) >= ITEM_LEN:
                msg = (
                    f"bad kmod policy: {name} item {item!r} has a newline or "
                    f"NUL, or is {ITEM_LEN} bytes or longer"
                )
                raise KmodError(msg)
    return policy


def _write(sysfs: Path, name: str, text: str) -> None:
    try:
        (sysfs / name).write_text(text)
    except OSError as exc:
        msg = f"the kernel module refused {name}={text.strip()!r}: {exc}"
        raise KmodError(msg) from exc


def apply_policy(policy: KmodPolicy, sysfs: str | Path = SYSFS) -> None:
    """Write a policy into the module's tunables (needs root).

    Lists go first and switches last, so that block mode starts with the
    new lists in place.

    Raises:
        KmodError: the module is not loaded, or refused a value (the
            message names the tunable).
    """
    path = Path(sysfs)
    if not path.is_dir():
        msg = f"{path} missing: the immune kernel module is not loaded"
        raise KmodError(msg)
    for name in ("exec_dirs", "patterns", "files"):
        items = getattr(policy, name)
        if items is not None:
            _write(path, name, "".join(f"{item}\n" for item in items))
    if policy.ports is not None:
        _write(path, "ports", ",".join(map(str, policy.ports)) + "\n")
    _write(path, "log_level", f"{policy.log_level}\n")
    for name in ("monitor_network", "monitor_files", "monitor_credentials"):
        _write(path, name, f"{int(getattr(policy, name))}\n")
    _write(path, "block_mode", f"{int(policy.block_mode)}\n")
    _write(path, "enabled", f"{int(policy.enabled)}\n")


def read_policy(sysfs: str | Path = SYSFS) -> KmodPolicy:
    """The policy the module holds now."""
    path = Path(sysfs)

    def lines(name: str) -> list[str]:
        return [x for x in (path / name).read_text().split("\n") if x]

    def flag(name: str) -> bool:
        return (path / name).read_text().strip() == "1"

    ports = (path / "ports").read_text().strip()
    return KmodPolicy(
        enabled=flag("enabled"),
        block_mode=flag("block_mode"),
        monitor_network=flag("monitor_network"),
        monitor_files=flag("monitor_files"),
        monitor_credentials=flag("monitor_credentials"),
        log_level=int((path / "log_level").read_text()),
        exec_dirs=lines("exec_dirs"),
        patterns=lines("patterns"),
        files=lines("files"),
        ports=[int(p) for p in ports.split(",") if p],
    )


def read_stats(sysfs: str | Path = SYSFS) -> dict[str, int]:
    """The module's counters: events, threats, blocks, drops, missed, ..."""
    stats: dict[str, int] = {}
    for line in (Path(sysfs) / "stats").read_text().splitlines():
        name, _, value = line.partition(" ")
        stats[name] = int(value)
    return stats


# --- The sensor ----------------------------------------------------------------


class KmodSensor(Sensor):
    """Events from IMMUNE's kernel module.

    Emits ``exec``, ``fork``, ``connect``, ``bind``, ``open`` and ``setuid``
    events, blocked ones with ``outcome="blocked"``; records of the agent's
    own process are skipped. A record that cannot be decoded is logged,
    counted in ``agent.kmod_bad_records`` and skipped.

    Args:
        device: the module's character device.
        sysfs: the directory of its tunables.
        policy: written into the tunables when the sensor opens (a dict as
            :func:`parse_policy` takes, or a :class:`KmodPolicy`).
    """

    name = "kmod"

    def __init__(
        self,
        *,
        agent_id: str,
        host: str,
        emit: Callable[[Event], None],
        metrics: Metrics | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        device: str = DEVICE,
        sysfs: str = SYSFS,
        policy: KmodPolicy | dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            agent_id=agent_id, host=host, emit=emit, metrics=metrics, on_error=on_error
        )
        self.device = device
        self.sysfs = sysfs
        self.policy = (
            policy
            if policy is None or isinstance(policy, KmodPolicy)
            else parse_policy(policy)
        )
        self._fd: int | None = None
        self._wake_fd: int | None = None
        self._self = os.getpid()

    def describe(self) -> str:
        return f"IMMUNE kernel module ({self.device})"

    def open(self) -> None:
        try:
            fd = os.open(self.device, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            self.unavailable(
                f"{self.device} missing: the immune kernel module is not loaded "
                "(insmod kernel/immune_kmod/immune.ko)"
            )
        except PermissionError as exc:
            self.unavailable(f"needs root: {exc}")
        if self.policy is not None:
            try:
                apply_policy(self.policy, self.sysfs)
            except BaseException:
                os.close(fd)
                raise
        self._fd = fd
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def close(self) -> None:
        for fd in (self._fd, self._wake_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._wake_fd = None

    def _wakeup(self) -> None:
        if self._wake_fd is not None:
            os.eventfd_write(self._wake_fd, 1)

    def _run(self) -> None:
        assert self._fd is not None and self._wake_fd is not None
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_fd, select.POLLIN)
        while not self._stopping.is_set():
            poller.poll()
            while not self._stopping.is_set() and self.drain():
                pass

    def drain(self) -> int:
        """Read and emit what the device holds now; returns the records read."""
        assert self._fd is not None
        try:
            data = os.read(self._fd, READ_BATCH * RECORD_SIZE)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EINTR):
                return 0
            raise
        count = len(data) // RECORD_SIZE
        if len(data) % RECORD_SIZE:
            # The module returns whole records only; say so if it did not.
            self.metrics.inc("agent.kmod_bad_records")
            logger.warning(
                "Kmod read of %d bytes is not whole records; the tail is skipped.",
                len(data),
            )
        self.metrics.inc("agent.kmod_records", count)
        for i in range(0, count * RECORD_SIZE, RECORD_SIZE):
            self.handle(data[i : i + RECORD_SIZE])
        return count

    def handle(self, raw: bytes) -> None:
        """Decode one record and emit its event (unless it is the agent's)."""
        try:
            rec = decode_record(raw)
        except KmodError as exc:
            self.metrics.inc("agent.kmod_bad_records")
            logger.warning("Kmod record skipped: %s.", exc)
            return
        if rec.pid == self._self:
            return
        self.emit(to_event(rec, agent_id=self.agent_id, host=self.host))
