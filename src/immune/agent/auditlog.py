"""Linux audit records to IMMUNE events: the parser shared by replay and live.

One audited system call produces several records sharing a serial number
(``msg=audit(<seconds>.<ms>:<serial>)``): SYSCALL (who, which call, its
result), EXECVE (the arguments), CWD, one PATH per file name touched,
SOCKADDR (the address of a connect or bind), PROCTITLE, and EOE at the end
(live only). :class:`Assembler` gathers them by serial number and turns each
complete group into one :class:`~immune.events.Event`.

Values come three ways: ``key="text"``, ``key=HEX`` (the kernel hex-encodes
a string holding a space, a quote or a control character) and plain words
and numbers. An EXECVE argument too long for one record is split into
``aN[0]``, ``aN[1]``... with ``aN_len``. Lines of ``log_format=ENRICHED``
carry a ``\\x1d`` and the interpreted fields after it, which are ignored.
"""

from __future__ import annotations

import ipaddress
import logging
import posixpath
import re
import struct
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from immune.events import Event, new_id

logger = logging.getLogger(__name__)

#: Record types by number (include/uapi/linux/audit.h), as netlink gives them.
TYPES = {
    1300: "SYSCALL",
    1302: "PATH",
    1306: "SOCKADDR",
    1307: "CWD",
    1309: "EXECVE",
    1320: "EOE",
    1327: "PROCTITLE",
}
ARCH_X86_64 = 0xC000003E
ARCH_AARCH64 = 0xC00000B7
_KINDS = {
    "exec": ("execve", "execveat"),
    "connect": ("connect",),
    "bind": ("bind",),
    "open": ("open", "openat", "openat2", "creat"),
    "setuid": ("setuid", "setreuid", "setresuid", "setgid", "setregid"),
    "fork": ("fork", "vfork", "clone", "clone3"),
    "exit": ("exit", "exit_group"),
}
_KINDS["setuid"] += ("setresgid",)
SYSCALLS = {
    ARCH_X86_64: {
        59: "execve", 322: "execveat", 42: "connect", 49: "bind", 2: "open",
        257: "openat", 437: "openat2", 85: "creat", 105: "setuid",
        113: "setreuid", 117: "setresuid", 106: "setgid", 114: "setregid",
        119: "setresgid", 57: "fork", 58: "vfork", 56: "clone", 435: "clone3",
        60: "exit", 231: "exit_group",
    },
    ARCH_AARCH64: {
        221: "execve", 281: "execveat", 203: "connect", 200: "bind",
        56: "openat", 437: "openat2", 146: "setuid", 145: "setreuid",
        147: "setresuid", 144: "setgid", 143: "setregid", 149: "setresgid",
        220: "clone", 435: "clone3", 93: "exit", 94: "exit_group",
    },
}  # fmt: skip
KIND_OF = {name: kind for kind, names in _KINDS.items() for name in names}
MAX_ARG = 4096
#: Groups waiting for more records; the oldest is completed beyond this.
MAX_PENDING = 1024

_HEADER = re.compile(
    r"^(?:node=(?P<node>\S+) )?type=(?P<type>\S+) "
    r"msg=audit\((?P<sec>\d+)\.(?P<ms>\d+):(?P<serial>\d+)\):\s?(?P<body>.*)$"
)
_FIELD = re.compile(r'([A-Za-z0-9_\[\]]+)=("[^"]*"|\S*)')
_HEX = re.compile(r"^(?:[0-9A-F]{2})+$")


class AuditFormatError(ValueError):
    """A line is not an audit record; the message quotes it."""


@dataclass
class Record:
    """One audit record: its type, serial, time (ns) and fields."""

    type: str
    serial: int
    ts: int
    fields: dict[str, str]
    node: str | None = None


def parse_fields(body: str) -> dict[str, str]:
    """The ``key=value`` pairs of a record's body (before any ``\\x1d``)."""
    body = body.split("\x1d", 1)[0]
    return {key: value for key, value in _FIELD.findall(body)}


def parse_line(line: str) -> Record:
    """Parse one line of ``audit.log``.

    Raises:
        AuditFormatError: the line has no ``type=... msg=audit(...)`` header.
    """
    match = _HEADER.match(line.strip())
    if match is None:
        shown = line.strip()[:80]
        msg = f"not an audit record (no type=... msg=audit(...) header): {shown!r}"
        raise AuditFormatError(msg)
    ts = int(match["sec"]) * 10**9 + int(match["ms"].ljust(3, "0")[:3]) * 10**6
    return Record(
        type=match["type"],
        serial=int(match["serial"]),
        ts=ts,
        fields=parse_fields(match["body"]),
        node=match["node"],
    )


def value(raw: str | None, *, encoded: bool = True) -> str | None:
    """A field's text: unquoted, or decoded from hex; None for ``(null)``."""
    if raw is None or raw in ("(null)", "?", ""):
        return None
    if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
        return raw[1:-1]
    if encoded and _HEX.match(raw):
        return bytes.fromhex(raw).decode("utf-8", "backslashreplace")
    return raw


def number(raw: str | None, base: int = 10) -> int | None:
    try:
        return int(raw, base) if raw is not None else None
    except ValueError:
        return None


def _id(raw: str | None) -> int | None:
    n = number(raw)
    # 4294967295 is "unset" (an auid before login).
    return None if n is None or n < 0 or n >= 2**32 - 1 else n


def argv_of(fields: dict[str, str]) -> list[str]:
    """The arguments of an EXECVE record, joining split ones.

    At most 1,024 arguments of at most 4,096 characters each are kept, the
    most an event holds.
    """
    argc = number(fields.get("argc")) or 0
    args: list[str] = []
    for index in range(min(argc, 1024)):
        key = f"a{index}"
        if key in fields:
            args.append((value(fields[key]) or "")[:MAX_ARG])
            continue
        parts, chunk = [], 0
        while f"{key}[{chunk}]" in fields:
            parts.append(fields[f"{key}[{chunk}]"])
            chunk += 1
        if parts:
            joined = "".join(p.strip('"') for p in parts)
            args.append((value(joined) or "")[:MAX_ARG])
    return args


def sockaddr(raw: str | None) -> tuple[str, int, str] | None:
    """(address, port, family) of a SOCKADDR record's hex ``saddr``."""
    if raw is None or not _HEX.match(raw):
        return None
    data = bytes.fromhex(raw)
    if len(data) < 8:
        return None
    family = struct.unpack_from("<H", data)[0]
    port = struct.unpack_from(">H", data, 2)[0]
    if family == 2:
        return str(ipaddress.IPv4Address(data[4:8])), port, "inet"
    if family == 10 and len(data) >= 24:
        return str(ipaddress.IPv6Address(data[8:24])), port, "inet6"
    return None


def syscall_name(fields: dict[str, str]) -> str | None:
    raw = fields.get("syscall")
    if raw is None:
        return None
    if not raw.isdigit():
        return raw  # already interpreted (ausearch -i)
    arch = number(fields.get("arch"), 16) or ARCH_X86_64
    return SYSCALLS.get(arch, SYSCALLS[ARCH_X86_64]).get(int(raw))


@dataclass
class Group:
    """The records of one audited call, by type."""

    serial: int
    ts: int
    node: str | None = None
    records: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    def add(self, record: Record) -> None:
        self.records.setdefault(record.type, []).append(record.fields)

    def first(self, kind: str) -> dict[str, str]:
        found = self.records.get(kind)
        return found[0] if found else {}


def to_event(group: Group, *, agent_id: str, host: str, sensor: str) -> Event | None:
    """The IMMUNE event of one group, or None if it is not a call we report."""
    call = group.first("SYSCALL")
    name = syscall_name(call)
    kind = KIND_OF.get(name or "")
    if kind is None:
        return None
    cwd = value(group.first("CWD").get("cwd"))
    fields: dict[str, Any] = {
        "pid": _id(call.get("pid")),
        "ppid": _id(call.get("ppid")),
        "uid": _id(call.get("uid")),
        "euid": _id(call.get("euid")),
        "comm": value(call.get("comm")),
        "exe": value(call.get("exe")),
        "cwd": cwd,
    }
    success = call.get("success")
    result = number(call.get("exit"))
    if kind == "exec" and success == "no" and result not in (-1, -13):
        return None  # a PATH lookup that missed (ENOENT): nothing ran
    fields["outcome"] = {"yes": "allowed", "no": "blocked"}.get(
        success or "", "unknown"
    )
    if success == "no" and result not in (-1, -13):
        fields["outcome"] = "unknown"  # failed for another reason than a refusal
    extra: dict[str, Any] = {"audit_serial": group.serial, "syscall": name}
    extra.update(exit=result, auid=_id(call.get("auid")), key=value(call.get("key")))
    _fill(kind, group, call, fields, extra, cwd)
    return Event(
        id=new_id(),
        agent_id=agent_id,
        host=(group.node or host)[:256],
        ts=group.ts,
        kind=kind,  # type: ignore[arg-type]  # a value of KIND_OF
        sensor=sensor,
        extra={k: v for k, v in extra.items() if v is not None} or None,
        **{k: v for k, v in fields.items() if v is not None},
    )


def _fill(
    kind: str,
    group: Group,
    call: dict[str, str],
    fields: dict[str, Any],
    extra: dict[str, Any],
    cwd: str | None,
) -> None:
    """The fields particular to one kind of event."""
    if kind == "exec":
        execve = group.first("EXECVE")
        if execve:
            fields["argv"] = argv_of(execve)
        elif "PROCTITLE" in group.records:
            title = value(group.first("PROCTITLE").get("proctitle")) or ""
            fields["argv"] = title.split("\0")
        fields["path"] = _path(group, cwd)
        if call.get("success") == "no" and fields["path"]:
            # A refused execve: exe is still the caller's program.
            extra["caller_exe"] = fields["exe"]
            fields["exe"] = fields["path"]
    elif kind == "open":
        fields["path"] = _path(group, cwd)
    elif kind in ("connect", "bind"):
        found = sockaddr(group.first("SOCKADDR").get("saddr"))
        if found:
            fields["addr"], fields["port"], fields["family"] = found
    elif kind == "setuid":
        extra["args"] = ",".join(str(number(call.get(f"a{i}"), 16)) for i in range(3))
    elif kind == "fork":
        # The call's result is the child; the event is about the child.
        child = number(call.get("exit"))
        if child is not None and child > 0:
            fields["ppid"], fields["pid"] = fields["pid"], child
    elif kind == "exit":
        fields["exit_code"] = number(call.get("a0"), 16)


def _path(group: Group, cwd: str | None) -> str | None:
    """The file the call named (not its parent directory), made absolute."""
    for path in group.records.get("PATH", []):
        if path.get("nametype") == "PARENT":
            continue
        name = value(path.get("name"))
        if name is None:
            continue
        if not name.startswith("/") and cwd:
            name = posixpath.normpath(f"{cwd}/{name}")
        return name
    return None


class Assembler:
    """Gathers records into groups by serial number and yields events.

    A group is complete at its EOE record (the live stream), when more than
    ``max_pending`` groups wait (the oldest goes), or at :meth:`flush`
    (the end of a file, whose records carry no EOE for every call).

    Args:
        agent_id: stamped on every event.
        host: the host name, unless a record names its ``node``.
        sensor: the events' ``sensor`` field.
        max_pending: groups held at most.
    """

    def __init__(
        self,
        *,
        agent_id: str,
        host: str,
        sensor: str = "audit",
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.agent_id = agent_id
        self.host = host
        self.sensor = sensor
        self.max_pending = max_pending
        self.pending: OrderedDict[tuple[str | None, int], Group] = OrderedDict()

    def add(self, record: Record) -> Iterator[Event]:
        """Take one record; yield the events it completes."""
        key = (record.node, record.serial)
        if record.type == "EOE":
            group = self.pending.pop(key, None)
            if group is not None:
                yield from self._finish(group)
            return
        group = self.pending.get(key)
        if group is None:
            group = self.pending[key] = Group(record.serial, record.ts, record.node)
        group.add(record)
        while len(self.pending) > self.max_pending:
            _, oldest = self.pending.popitem(last=False)
            yield from self._finish(oldest)

    def flush(self) -> Iterator[Event]:
        """Complete every group still waiting, oldest first."""
        while self.pending:
            _, group = self.pending.popitem(last=False)
            yield from self._finish(group)

    def _finish(self, group: Group) -> Iterator[Event]:
        event = to_event(
            group, agent_id=self.agent_id, host=self.host, sensor=self.sensor
        )
        if event is not None:
            yield event


def read_log(
    lines: Iterable[str], assembler: Assembler, errors: list[str] | None = None
) -> Iterator[Event]:
    """Events of an audit.log's lines; unreadable lines go to ``errors``.

    Args:
        lines: the file's lines, split at newlines only (``str.splitlines``
            would also split at the ``\x1d`` of enriched records).
        assembler: gathers the records.
        errors: gets ``"line N: reason"`` for each line that is not a record;
            when None, such a line raises.

    Raises:
        AuditFormatError: a line is not a record and ``errors`` is None.
    """
    for number_, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = parse_line(line)
        except AuditFormatError as exc:
            if errors is None:
                raise AuditFormatError(f"line {number_}: {exc}") from None
            errors.append(f"line {number_}: {exc}")
            continue
        yield from assembler.add(record)
    yield from assembler.flush()
