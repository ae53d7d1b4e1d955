"""The agent's local policy: what its sensors report, and what they refuse.

The rules are the original agent's, grouped by hook, each with a ``mode``:
``audit`` reports a match, ``block`` also refuses it where a sensor can
(fanotify refuses execs and opens with EPERM; a command line that matches is
killed at once, since it has already been exec'd). The policy lives in a TOML
file (see ``docs/policy.md``); :class:`PolicyStore` reloads it on SIGHUP or
when the file changes, and :func:`apply_policy` is what the hive's ``policy``
command calls with a new one. Every change is validated whole before it
replaces the rules in force, so a bad policy never half-applies.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import msgspec
import re2
import tomli_w

from immune.errors import ImmuneError
from immune.events import Event, Severity

logger = logging.getLogger(__name__)

Mode = Literal["audit", "block"]
PortNumber = Annotated[int, msgspec.Meta(ge=1, le=65535)]
PathText = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]

TEMP_DIRS = ["/tmp/", "/dev/shm/", "/var/tmp/"]
REVERSE_SHELLS = [
    r"\bnc(\.traditional|\.openbsd)?\s",
    r"\bncat\b",
    r"/dev/tcp/",
    r"/dev/udp/",
    r"\bbash\s+-i\b",
    r"\bpython[0-9.]*\s+-c\b",
    r"\bperl\s+-e\b",
    r"\bruby\s+-e\b",
    r"\|\s*(ba)?sh\b",
    r"\bwget\s",
    r"\bcurl\s",
]
BLOCKED_PORTS = [4444, 5555, 6666, 31337, 12345]
SENSITIVE_FILES = [
    "/etc/shadow",
    "/etc/gshadow",
    "/etc/master.passwd",
    "/etc/passwd",
    "/etc/sudoers",
    "/root/.ssh/id_rsa",
    "/root/.ssh/authorized_keys",
    "/home/*/.ssh/id_rsa",
    "/home/*/.ssh/authorized_keys",
    "/var/log/auth.log",
]


class PolicyError(ImmuneError):
    """A policy was refused; the message names the key at fault."""


class ExecRule(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    #: Executables under these directories (a trailing slash is added).
    mode: Mode = "audit"
    paths: list[PathText] = msgspec.field(default_factory=lambda: list(TEMP_DIRS))
    severity: Severity = "high"


class CmdlineRule(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    #: RE2 patterns searched in the command line (argv joined by spaces).
    mode: Mode = "audit"
    patterns: list[str] = msgspec.field(default_factory=lambda: list(REVERSE_SHELLS))
    severity: Severity = "high"


class PortRule(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    #: Remote ports of a connect (and local ports of a bind) reported.
    mode: Mode = "audit"
    ports: list[PortNumber] = msgspec.field(default_factory=lambda: BLOCKED_PORTS[:])
    severity: Severity = "high"


class FileRule(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    #: Absolute paths, with shell globs expanded when the policy is applied,
    #: or directories (a trailing slash) whose files are all watched.
    mode: Mode = "audit"
    paths: list[PathText] = msgspec.field(default_factory=lambda: SENSITIVE_FILES[:])
    severity: Severity = "medium"


class SetuidRule(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    #: A change of effective uid from non-root to root.
    mode: Mode = "audit"
    severity: Severity = "critical"


class Limits(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    #: Events each sensor may report per second on average, and in a burst;
    #: beyond that they are dropped and counted (blocking goes on regardless).
    events_per_second: Annotated[float, msgspec.Meta(gt=0)] = 20_000.0
    burst: Annotated[int, msgspec.Meta(ge=1)] = 50_000


class Policy(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    exec: ExecRule = msgspec.field(default_factory=ExecRule)
    cmdline: CmdlineRule = msgspec.field(default_factory=CmdlineRule)
    ports: PortRule = msgspec.field(default_factory=PortRule)
    files: FileRule = msgspec.field(default_factory=FileRule)
    setuid: SetuidRule = msgspec.field(default_factory=SetuidRule)
    limits: Limits = msgspec.field(default_factory=Limits)


@dataclass(frozen=True)
class Verdict:
    """A rule an event matched: which, what to do, and how bad."""

    rule: str
    mode: Mode
    severity: Severity

    @property
    def block(self) -> bool:
        return self.mode == "block"


class Rules:
    """A validated policy, compiled for matching on the sensors' threads.

    Args:
        policy: the policy, as parsed.

    Raises:
        PolicyError: a pattern does not compile or a path is not absolute.
    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.exec_dirs = tuple(_as_dir(p, "exec.paths") for p in policy.exec.paths)
        self.ports = frozenset(policy.ports.ports)
        self.file_dirs = tuple(p for p in policy.files.paths if p.endswith("/"))
        files = [p for p in policy.files.paths if not p.endswith("/")]
        for path in files:
            _check_absolute(path, "files.paths")
        self.file_globs = tuple(files)
        self.cmdline = _compile(policy.cmdline.patterns)

    def watched_files(self) -> list[str]:
        """The files of ``files.paths`` that exist now, globs expanded."""
        found: list[str] = []
        for pattern in self.file_globs:
            if glob.has_magic(pattern):
                found.extend(sorted(glob.glob(pattern)))
            else:
                found.append(pattern)
        return found

    def exec_verdict(self, path: str | None) -> Verdict | None:
        """The verdict on running the executable ``path``."""
        if path and path.startswith(self.exec_dirs):
            rule = self.policy.exec
            return Verdict("exec_path", rule.mode, rule.severity)
        return None

    def cmdline_verdict(self, argv: Iterable[str] | None) -> Verdict | None:
        if argv is None or self.cmdline is None:
            return None
        if self.cmdline.Match(" ".join(argv)):
            rule = self.policy.cmdline
            return Verdict("reverse_shell", rule.mode, rule.severity)
        return None

    def file_verdict(self, path: str | None) -> Verdict | None:
        if not path:
            return None
        if path.startswith(self.file_dirs) or any(
            _glob_match(pattern, path) for pattern in self.file_globs
        ):
            rule = self.policy.files
            return Verdict("sensitive_file", rule.mode, rule.severity)
        return None

    def port_verdict(self, port: int | None) -> Verdict | None:
        if port is not None and port in self.ports:
            rule = self.policy.ports
            return Verdict("blocked_port", rule.mode, rule.severity)
        return None

    def setuid_verdict(self, old_euid: int | None, euid: int | None) -> Verdict | None:
        if old_euid not in (None, 0) and euid == 0:
            rule = self.policy.setuid
            return Verdict("setuid_root", rule.mode, rule.severity)
        return None

    def verdict(self, event: Event) -> Verdict | None:
        """The first rule ``event`` matches, by its kind."""
        if event.kind == "exec":
            return self.exec_verdict(event.exe) or self.cmdline_verdict(event.argv)
        if event.kind == "open":
            return self.file_verdict(event.path)
        if event.kind == "connect":
            return self.port_verdict(event.port)
        if event.kind == "setuid":
            return self.setuid_verdict(event.old_euid, event.euid)
        return None


def _as_dir(path: str, key: str) -> str:
    _check_absolute(path, key)
    return path if path.endswith("/") else path + "/"


def _check_absolute(path: str, key: str) -> None:
    if not path.startswith("/"):
        msg = f"policy {key}: {path!r} is not an absolute path; start it with /"
        raise PolicyError(msg)


def _glob_match(pattern: str, path: str) -> bool:
    if not glob.has_magic(pattern):
        return pattern == path
    # An absolute pattern matches the whole path, each * within one component.
    return PurePosixPath(path).match(pattern)


def _compile(patterns: list[str]) -> Any:
    if not patterns:
        return None
    regex_set = re2.Set.SearchSet()
    for index, pattern in enumerate(patterns):
        try:
            regex_set.Add(pattern)
        except re2.error as exc:
            msg = f"policy cmdline.patterns[{index}]: {pattern!r} is not RE2: {exc}"
            raise PolicyError(msg) from None
    regex_set.Compile()
    return regex_set


def parse(data: dict[str, Any], source: str = "policy") -> Rules:
    """Validate a policy given as a dict (TOML or JSON decoded).

    Raises:
        PolicyError: naming the source and the key at fault.
    """
    try:
        policy = msgspec.convert(data, Policy)
    except msgspec.ValidationError as exc:
        raise PolicyError(f"invalid {source}: {exc}") from None
    try:
        return Rules(policy)
    except PolicyError as exc:
        raise PolicyError(f"invalid {source}: {exc}") from None


def load(path: str | os.PathLike[str]) -> Rules:
    """Read and validate a policy file.

    Raises:
        PolicyError: the file is missing, not TOML, or invalid.
    """
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        msg = (
            f"policy file {path} does not exist; start from a copy of "
            "docs/policy.example.toml (the defaults)"
        )
        raise PolicyError(msg) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy file {path} is not valid TOML: {exc}") from None
    return parse(data, f"policy file {path}")


def dump(policy: Policy) -> str:
    """The policy as TOML text, every rule spelled out."""
    text: str = tomli_w.dumps(msgspec.to_builtins(policy))
    return "# IMMUNE local policy: mode = audit reports, block refuses.\n\n" + text


Listener = Callable[[Rules], None]


class PolicyStore:
    """The rules in force, swapped whole when the policy changes.

    Sensors read :attr:`rules` on each event (one attribute read, no lock)
    and may :meth:`subscribe` to adjust their kernel filters on a change.

    Args:
        path: the policy file, or None to keep the defaults in memory only.
            ``reloads`` and ``refused`` count the changes put in force and
            the policies refused.

    Raises:
        PolicyError: the file exists but is not a valid policy.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path else None
        self.rules = Rules(Policy())
        self.reloads = 0
        self.refused = 0
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._watcher: threading.Thread | None = None
        self._stopping = threading.Event()
        if self.path is not None and self.path.exists():
            self.rules = load(self.path)
            self._mtime = self.path.stat().st_mtime

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def replace(self, rules: Rules) -> None:
        """Put ``rules`` in force and tell the subscribers."""
        with self._lock:
            self.rules = rules
            self.reloads += 1
        for listener in self._listeners:
            try:
                listener(rules)
            except Exception:
                logger.exception("Policy listener %r failed.", listener)

    def reload(self) -> bool:
        """Read the file again; keep the rules in force if it is invalid."""
        if self.path is None:
            return False
        try:
            rules = load(self.path)
            self._mtime = self.path.stat().st_mtime
        except (PolicyError, OSError) as exc:
            self.refused += 1
            logger.error("Policy not reloaded, the previous one stays: %s.", exc)
            return False
        self.replace(rules)
        logger.info("Policy reloaded from %s.", self.path)
        return True

    def apply(self, data: dict[str, Any]) -> dict[str, Any]:
        """Validate and apply a policy sent by the hive, and save it.

        Raises:
            PolicyError: the policy is invalid (the rules in force stay).
        """
        try:
            rules = parse(data, "policy from the hive")
        except PolicyError:
            self.refused += 1
            raise
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(dump(rules.policy), encoding="utf-8")
            os.replace(tmp, self.path)
            self._mtime = self.path.stat().st_mtime
        self.replace(rules)
        logger.info("Policy applied from the hive.")
        return {"applied": True, "saved": str(self.path) if self.path else None}

    def watch(self, interval: float = 1.0) -> None:
        """Reload whenever the file's modification time changes."""
        if self.path is None or self._watcher is not None:
            return
        self._watcher = threading.Thread(
            target=self._watch, args=(interval,), name="immune-policy", daemon=True
        )
        self._watcher.start()

    def _watch(self, interval: float) -> None:
        assert self.path is not None
        while not self._stopping.wait(interval):
            try:
                mtime = self.path.stat().st_mtime
            except OSError:
                continue
            if mtime != self._mtime:
                self._mtime = mtime
                self.reload()

    def close(self) -> None:
        self._stopping.set()


_store = PolicyStore()


def current() -> PolicyStore:
    """The store the running agent's sensors read (defaults until set)."""
    return _store


def install(store: PolicyStore) -> None:
    """Make ``store`` the one :func:`apply_policy` and sensors use."""
    global _store
    _store = store


def apply_policy(data: dict[str, Any]) -> dict[str, Any]:
    """Apply a new local policy (the hive's ``policy`` command).

    Args:
        data: the policy as a dict, the same tables as the TOML file; missing
            tables take their defaults.

    Returns:
        ``{"applied": True, "saved": <file or None>}``.

    Raises:
        PolicyError: the policy is invalid; the message names the key.
    """
    return _store.apply(data)
