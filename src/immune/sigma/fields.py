"""Where Sigma's fields are found in IMMUNE's events.

Two tables make the mapping. ``SIGMA_FIELDS`` names, for each log source
IMMUNE can feed, the IMMUNE field that stands for each Sigma field; it
becomes a pySigma :class:`~sigma.processing.pipeline.ProcessingPipeline`
that renames the fields of a rule, and refuses, naming it, a field that has
no equivalent. ``FIELDS`` then says how to read each IMMUNE field from an
event, and on which event kinds it exists. ``docs/sigma.md`` shows both as
one table; a test keeps the two in step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sigma.exceptions import SigmaTransformationError
from sigma.processing.conditions import LogsourceCondition
from sigma.processing.pipeline import ProcessingItem, ProcessingPipeline
from sigma.processing.transformations.base import DetectionItemTransformation
from sigma.processing.transformations.fields import FieldMappingTransformation

from immune.events import HOST_KINDS, Event

if TYPE_CHECKING:
    from sigma.rule import SigmaDetection, SigmaDetectionItem

#: What a field read from an event may be: a tuple for a field with several
#: values (any of them may match), None when the event does not have it.
Value = str | int | float | bool | tuple[str, ...] | None

#: Sigma log source category to the event kinds that stand for it.
CATEGORY_KINDS: dict[str, tuple[str, ...]] = {
    "process_creation": ("exec",),
    "process_termination": ("exit",),
    "network_connection": ("connect", "bind"),
    "file_event": ("open",),
    "file_access": ("open",),
}

#: Sigma log source services IMMUNE events stand for; their kinds are found
#: from the fields each rule uses (see ``kinds_of``).
SERVICES = ("auditd",)

# Fields of Sysmon-style rules (the categories above), shared by all of them.
_PROCESS = {
    "Image": "exe",
    "CommandLine": "cmdline",
    "ProcessId": "pid",
    "ParentProcessId": "ppid",
    "ParentImage": "parent.exe",
    "ParentCommandLine": "parent.cmdline",
    "CurrentDirectory": "cwd",
    "User": "user",
    "Computer": "host",
}
_FILE = {"TargetFilename": "path"}
_NETWORK = {
    "DestinationIp": "addr",
    "DestinationPort": "port",
    "Initiated": "initiated",
}
#: auditd record fields; ``a0``..``a63`` are the arguments (EXECVE records).
_AUDITD = {
    "type": "audit.type",
    "SYSCALL": "audit.syscall",
    "syscall": "audit.syscall",
    "exe": "exe",
    "comm": "comm",
    "cwd": "cwd",
    "name": "path",
    "pid": "pid",
    "ppid": "ppid",
    "uid": "uid",
    "euid": "euid",
    "argc": "argc",
    "node": "host",
} | {f"a{n}": f"argv.{n}" for n in range(64)}

#: Log source (category or service) to Sigma field to IMMUNE field.
SIGMA_FIELDS: dict[str, dict[str, str]] = {
    "process_creation": _PROCESS,
    "process_termination": {"Image": "exe", "ProcessId": "pid"},
    "network_connection": _PROCESS | _NETWORK,
    "file_event": _PROCESS | _FILE,
    "file_access": _PROCESS | _FILE,
    "auditd": _AUDITD,
}

#: Why some Sigma fields that rules use have no equivalent, for the refusal.
WHY_MISSING = {
    "DestinationHostname": "events carry the remote address, not the host name "
    "that was resolved to it",
    "LogonId": "events carry no login session id",
    "key": "events do not come from auditd, so there is no audit rule key",
    "nametype": "open events do not say whether the file was created",
    "unit": "IMMUNE reports no service start or stop",
}


# -- reading fields from events --------------------------------------------


@dataclass(frozen=True, slots=True)
class Process:
    """What the process table knows of a process: its program and command line."""

    exe: str | None
    cmdline: str | None


class ProcessTable:
    """The last program each process ran, per agent, for the parent fields.

    Events name the parent by pid only; ``ParentImage`` and
    ``ParentCommandLine`` are read from the exec the parent made (or the one
    it inherited across fork). The table holds at most ``limit`` processes
    and forgets the least recently seen first, so it cannot grow without end.

    Args:
        limit: the most processes remembered, at least 1.
    """

    def __init__(self, limit: int = 65_536) -> None:
        if limit < 1:
            raise ValueError(f"process table limit must be at least 1, got {limit}")
        self.limit = limit
        self._table: OrderedDict[tuple[str, int], Process] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def parent(self, event: Event) -> Process | None:
        """The event's parent process as last seen, or None."""
        if event.ppid is None:
            return None
        return self._table.get((event.agent_id, event.ppid))

    def update(self, event: Event) -> None:
        """Learn from an event: exec sets, fork inherits, exit forgets."""
        if event.pid is None:
            return
        key = (event.agent_id, event.pid)
        if event.kind == "exec":
            self._put(key, Process(event.exe, event.cmdline or None))
        elif event.kind == "fork":
            parent = self.parent(event)
            if parent is not None:
                self._put(key, parent)
        elif event.kind == "exit":
            self._table.pop(key, None)

    def _put(self, key: tuple[str, int], process: Process) -> None:
        self._table[key] = process
        self._table.move_to_end(key)
        if len(self._table) > self.limit:
            self._table.popitem(last=False)


class Subject:
    """An event under evaluation, with its parent and the field values read so far.

    Each field is read and lower-cased once per event, however many rules
    look at it.
    """

    __slots__ = ("event", "parent", "_raw", "_lower")

    def __init__(self, event: Event, parent: Process | None = None) -> None:
        self.event = event
        self.parent = parent
        self._raw: dict[str, Value] = {}
        self._lower: dict[str, Value] = {}

    def value(self, name: str) -> Value:
        """The value of an IMMUNE field (see ``FIELDS``)."""
        try:
            return self._raw[name]
        except KeyError:
            value = self._raw[name] = FIELDS[name].read(self.event, self.parent)
            return value

    def lowered(self, name: str) -> Value:
        """The value, with text in lower case, for case-insensitive matching."""
        try:
            return self._lower[name]
        except KeyError:
            value = self.value(name)
            if isinstance(value, str):
                value = value.lower()
            elif isinstance(value, tuple):
                value = tuple(v.lower() for v in value)
            self._lower[name] = value
            return value


Reader = Callable[[Event, Process | None], Value]


@dataclass(frozen=True)
class FieldSpec:
    """An IMMUNE field as Sigma rules see it.

    Args:
        read: reads the value from an event and its parent.
        kinds: the event kinds that have it.
        doc: one line for the documentation.
        constant: for a field whose value depends on the event kind alone,
            that value for each kind; tests of it are decided when the rule
            is compiled.
    """

    read: Reader
    kinds: tuple[str, ...]
    doc: str
    constant: dict[str, tuple[str, ...]] | None = None

    @property
    def domain(self) -> tuple[str, ...] | None:
        """Every value the field can take, when it is a constant per kind."""
        if self.constant is None:
            return None
        return tuple(sorted({v for values in self.constant.values() for v in values}))


_AUDIT_TYPES = {
    "exec": ("SYSCALL", "EXECVE"),
    "open": ("SYSCALL", "PATH"),
    "connect": ("SYSCALL", "SOCKADDR"),
    "bind": ("SYSCALL", "SOCKADDR"),
    "fork": ("SYSCALL",),
    "setuid": ("SYSCALL",),
}
_SYSCALLS = {
    "exec": ("execve", "execveat"),
    "open": ("open", "openat", "openat2"),
    "connect": ("connect",),
    "bind": ("bind",),
    "fork": ("fork", "vfork", "clone", "clone3"),
    "setuid": ("setuid", "setreuid", "setresuid"),
}


def _attr(name: str) -> Reader:
    def read(event: Event, parent: Process | None) -> Value:
        value: Value = getattr(event, name)
        return value

    return read


def _arg(number: int) -> Reader:
    def read(event: Event, parent: Process | None) -> Value:
        argv = event.argv
        return argv[number] if argv is not None and number < len(argv) else None

    return read


def _cmdline(event: Event, parent: Process | None) -> Value:
    return event.cmdline if event.argv is not None or event.exe else None


def _user(event: Event, parent: Process | None) -> Value:
    # A sensor that resolved the name puts it in extra; root is root everywhere.
    name = (event.extra or {}).get("user")
    if isinstance(name, str):
        return name
    return "root" if event.uid == 0 else None


def _initiated(event: Event, parent: Process | None) -> Value:
    return {"connect": "true", "bind": "false"}.get(event.kind)


def _keywords(event: Event, parent: Process | None) -> Value:
    # What a full-text search of the log line would see: the text the event has.
    parts = [event.cmdline, event.path, event.addr]
    return " ".join(part for part in parts if part) or None


def _argc(event: Event, parent: Process | None) -> Value:
    return len(event.argv) if event.argv is not None else None


_ALL = HOST_KINDS
FIELDS: dict[str, FieldSpec] = {
    "host": FieldSpec(_attr("host"), _ALL, "the host's name"),
    "agent_id": FieldSpec(_attr("agent_id"), _ALL, "the agent's id"),
    "exe": FieldSpec(_attr("exe"), _ALL, "the executable's absolute path"),
    "cmdline": FieldSpec(_cmdline, _ALL, "`argv` joined with spaces"),
    "comm": FieldSpec(_attr("comm"), _ALL, "the process name"),
    "pid": FieldSpec(_attr("pid"), _ALL, "the process id"),
    "ppid": FieldSpec(_attr("ppid"), _ALL, "the parent's process id"),
    "uid": FieldSpec(_attr("uid"), _ALL, "the real user id"),
    "euid": FieldSpec(_attr("euid"), _ALL, "the effective user id"),
    "cwd": FieldSpec(_attr("cwd"), _ALL, "the working directory"),
    "user": FieldSpec(
        _user, _ALL, "`extra.user` if the sensor set it, else `root` when uid is 0"
    ),
    "parent.exe": FieldSpec(
        lambda e, p: p.exe if p else None,
        _ALL,
        "`exe` of the parent's last exec (process table)",
    ),
    "parent.cmdline": FieldSpec(
        lambda e, p: p.cmdline if p else None,
        _ALL,
        "`cmdline` of the parent's last exec (process table)",
    ),
    "path": FieldSpec(_attr("path"), ("open",), "the file opened"),
    "addr": FieldSpec(_attr("addr"), ("connect", "bind"), "the remote address"),
    "port": FieldSpec(_attr("port"), ("connect", "bind"), "the remote port"),
    "initiated": FieldSpec(
        _initiated, ("connect", "bind"), "`true` on connect, `false` on bind"
    ),
    "argc": FieldSpec(_argc, ("exec",), "the number of arguments"),
    "audit.type": FieldSpec(
        lambda e, p: _AUDIT_TYPES.get(e.kind, ()),
        _ALL,
        "the auditd records the event stands for, by kind",
        constant=_AUDIT_TYPES,
    ),
    "audit.syscall": FieldSpec(
        lambda e, p: _SYSCALLS.get(e.kind, ()),
        _ALL,
        "the system calls the event stands for, by kind",
        constant=_SYSCALLS,
    ),
    "keywords": FieldSpec(
        _keywords, _ALL, "for keyword searches: `cmdline`, `path` and `addr` joined"
    ),
} | {f"argv.{n}": FieldSpec(_arg(n), ("exec",), f"`argv[{n}]`") for n in range(64)}


# -- the pySigma pipeline ----------------------------------------------------


@dataclass
class RefuseUnmapped(DetectionItemTransformation):
    """Refuses a rule that tests a field IMMUNE's events do not have.

    Args:
        source: the log source, for the message.
        known: the Sigma fields that are mapped for it.
    """

    source: str
    known: dict[str, str]

    def apply_detection_item(
        self, detection_item: SigmaDetectionItem
    ) -> SigmaDetection | SigmaDetectionItem | None:
        name = detection_item.field
        if name is not None and name not in self.known:
            why = WHY_MISSING.get(name, "IMMUNE's events have no such field")
            msg = f"field {name!r} of {self.source} cannot be evaluated: {why}"
            raise SigmaTransformationError(msg, source=detection_item.source)
        return None


def pipeline() -> ProcessingPipeline:
    """The pySigma pipeline that renames Sigma fields to IMMUNE fields.

    One pair of items per log source: the first refuses fields that have no
    equivalent, the second renames the others.
    """
    items: list[ProcessingItem] = []
    for source, mapping in SIGMA_FIELDS.items():
        for transformation in (
            RefuseUnmapped(source, mapping),
            FieldMappingTransformation(_renames(mapping)),
        ):
            items.append(
                ProcessingItem(
                    transformation,
                    identifier=f"immune_{source}",
                    rule_conditions=[_logsource(source)],
                )
            )
    return ProcessingPipeline(items=items, name="IMMUNE events")


def _logsource(source: str) -> LogsourceCondition:
    # Each processing item needs a condition object of its own.
    if source in SERVICES:
        return LogsourceCondition(product="linux", service=source)
    return LogsourceCondition(category=source)


def _renames(mapping: dict[str, str]) -> dict[str | None, str | list[str]]:
    return {name: target for name, target in mapping.items()}
