"""alert: alert channels. This first version writes to the console and a file.

Configuration (``[plugins.alert]``)::

    console = true                 # print alerts as they happen
    file = "immune-alerts.log"     # append alerts here; "" to disable
    format = "json"                # the file's format: "json" lines or "text"
    min_severity = "low"           # quieter channels see fewer alerts

Each line of the text format reads
``[YYYY-mm-dd HH:MM:SS] [LEVEL] title: details``. The notices of playbooks
(their ``alert`` and ``notify`` steps, on ``notify.<severity>``) go to the
same channels, as ``[...] [LEVEL] playbook: message [agents] (alert id)``.
Every value that came from a host is escaped, so an attacker cannot forge
lines or drive the terminal.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.markup import escape

from immune.events import SEVERITIES, SEVERITY_RANK, Alert, encode
from immune.hookspecs import hookimpl
from immune.safe import printable

logger = logging.getLogger(__name__)

_STYLE = {
    "info": "dim",
    "low": "cyan",
    "medium": "yellow",
    "high": "bold red",
    "critical": "bold white on red",
}
_DETAIL_KEYS = ("pid", "uid", "euid", "old_euid", "exe", "path", "addr", "port", "cve")


def format_line(alert: Alert) -> str:
    """The one-line text form of an alert, with host data escaped."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(alert.ts / 1e9))
    details = [f"host={alert.host}"] if alert.host else []
    details += [f"{k}={alert.data[k]}" for k in _DETAIL_KEYS if k in alert.data]
    if "cmdline" in alert.data:
        details.append(f"cmdline={alert.data['cmdline']!r}")
    tags = ", ".join([alert.rule, *alert.techniques])
    text = f"{alert.title}: {' '.join(details)} ({tags})"
    return f"[{when}] [{alert.severity.upper()}] {printable(text, 2048)}"


def format_notice(note: dict[str, Any]) -> str:
    """The one-line text form of a playbook's notice, escaped."""
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    mode = " (dry-run)" if note.get("dry_run") else ""
    agents = ", ".join(map(str, note.get("agents") or [])) or "no agent"
    text = (
        f"{note.get('playbook', '?')}{mode}: {note.get('message', '')} "
        f"[{agents}] (alert {note.get('alert_id')})"
    )
    severity = str(note.get("severity", "info")).upper()
    return f"[{when}] [{severity}] {printable(text, 2048)}"


class AlertPlugin:
    """Prints alerts and appends them to a file."""

    def __init__(self) -> None:
        self.console: Console | None = None
        self.file: IO[bytes] | None = None
        self.path: Path | None = None
        self.format = "json"
        self.min_rank = SEVERITY_RANK["low"]

    @hookimpl
    def immune_describe(self) -> dict[str, str]:
        return {"description": "alert channels: console and file"}

    @hookimpl
    def immune_configure(self, config: dict[str, Any]) -> None:
        unknown = set(config) - {"console", "file", "format", "min_severity"}
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}")
        severity = config.get("min_severity", "low")
        if severity not in SEVERITY_RANK:
            raise ValueError(f"min_severity must be one of {', '.join(SEVERITIES)}")
        self.min_rank = SEVERITY_RANK[severity]
        self.format = config.get("format", "json")
        if self.format not in ("json", "text"):
            raise ValueError("format must be 'json' or 'text'")
        if config.get("console", True):
            self.console = Console(highlight=False)
        path = config.get("file", "immune-alerts.log")
        self.path = Path(path) if path else None

    @hookimpl
    def immune_subscriptions(self) -> list[tuple[str, Any]]:
        return [("alert.#", self.on_alert), ("notify.*", self.on_notify)]

    @hookimpl
    def immune_start(self) -> None:
        if self.path is not None:
            self.file = self.path.open("ab", buffering=0)
            logger.info("Appending alerts to %s.", self.path)

    @hookimpl
    def immune_stop(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def on_notify(self, note: dict[str, Any]) -> None:
        """A playbook's ``alert``/``notify`` step: tell the same channels."""
        severity = note.get("severity") if isinstance(note, dict) else None
        if severity not in SEVERITY_RANK or SEVERITY_RANK[severity] < self.min_rank:
            return
        line = format_notice(note)
        if self.console is not None:
            style = _STYLE[severity]
            self.console.print(f"[{style}]{escape(line)}[/]", soft_wrap=True)
        if self.file is not None:
            data = encode(note) if self.format == "json" else line.encode()
            self.file.write(data + b"\n")

    def on_alert(self, alert: Alert) -> None:
        if SEVERITY_RANK[alert.severity] < self.min_rank:
            return
        line = format_line(alert)
        if self.console is not None:
            style = _STYLE[alert.severity]
            self.console.print(f"[{style}]{escape(line)}[/]", soft_wrap=True)
        if self.file is not None:
            data = encode(alert) if self.format == "json" else line.encode()
            self.file.write(data + b"\n")
