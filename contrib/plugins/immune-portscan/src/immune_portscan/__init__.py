"""immune-portscan: a process that probes many ports of one remote address.

A connect scan (``nmap -sT``, a netcat loop, a worm looking for services)
shows up as one process connecting to many distinct ports of the same
address in a short time, where ordinary clients reuse a handful. The plugin
counts, per agent, process and remote address, the distinct destination
ports seen within a sliding window, and raises one alert when the count
reaches the threshold; it then stays quiet about that process and address
for one window, so a long scan gives one alert a window, not one per port.

Configuration (``[plugins.portscan]``), every key optional::

    threshold = 20              # distinct ports that make a scan, 2 to 65536
    window = 60.0               # seconds the ports are counted over
    severity = "medium"         # of the alert: info, low, medium, high, critical
    max_tracked = 10000         # (agent, process, address) triples kept at once
    ignore_addrs = ["10.1.2.0/24"]          # destinations never counted (CIDR)
    ignore_exes = ["/usr/sbin/monitoring"]  # processes never counted

Memory is bounded: ports older than the window are forgotten, a triple never
holds ``threshold`` ports (reaching it raises the alert and empties it), and
the least recently active triple is dropped once ``max_tracked`` are held.
Time is the events' own ``ts``, so a replayed or delayed batch is judged by
when things happened, not by when they arrived.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from immune import hookimpl
from immune.errors import PluginError
from immune.events import Event, Severity
from immune.safe import printable

if TYPE_CHECKING:
    from immune.hive import Hive

__version__ = "0.1.0"

NAME = "portscan"
RULE = "port-scan"
#: MITRE ATT&CK: Network Service Discovery.
TECHNIQUES = ("T1046",)

logger = logging.getLogger(f"immune.plugins.{NAME}")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Settings(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The ``[plugins.portscan]`` table, validated.

    Args:
        threshold: distinct ports of one address that make a scan, 2 to 65536.
        window: seconds over which ports are counted, above 0, at most a day.
        severity: of the alerts raised.
        max_tracked: (agent, process, address) triples held at once, >= 1.
        ignore_addrs: networks in CIDR notation whose addresses are never
            counted (a single address is a /32 or /128).
        ignore_exes: executables, by full path, whose connections are never
            counted.
    """

    threshold: Annotated[int, msgspec.Meta(ge=2, le=65536)] = 20
    window: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 60.0
    severity: Severity = "medium"
    max_tracked: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 10_000
    ignore_addrs: list[str] = msgspec.field(default_factory=list)
    ignore_exes: list[str] = msgspec.field(default_factory=list)

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> Settings:
        """Validate a configuration table.

        Raises:
            PluginError: naming the key at fault and what it should be.
        """
        try:
            settings = msgspec.convert(table, cls)
        except msgspec.ValidationError as exc:
            # "Expected `int` >= 2 - at `$.threshold`" reads better key first.
            text, _, where = str(exc).partition(" - at `$.")
            table_name = f"[plugins.{NAME}]"
            if where:
                table_name += " " + where.rstrip("`")
            raise PluginError(NAME, f"{table_name}: {text}") from None
        settings.networks()  # refuse a bad CIDR now, not on the first event
        return settings

    def networks(self) -> tuple[Network, ...]:
        """``ignore_addrs`` parsed.

        Raises:
            PluginError: an entry is not an address or a network.
        """
        result = []
        for text in self.ignore_addrs:
            try:
                result.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                msg = (
                    f"[plugins.{NAME}] ignore_addrs: {text!r} is not an IP "
                    "address or a network such as 10.0.0.0/8"
                )
                raise PluginError(NAME, msg) from None
        return tuple(result)


@dataclass(frozen=True)
class Finding:
    """A scan: the ports one process reached on one address within a window.

    ``events`` holds the latest connect to each port, oldest first.
    """

    agent_id: str
    process: str
    addr: str
    events: tuple[Event, ...]

    @property
    def ports(self) -> list[int]:
        return sorted(e.port for e in self.events if e.port is not None)


@dataclass
class _Probe:
    """What one process did to one address lately."""

    # Port to the latest connect to it, in the order last seen, so that the
    # stale ones are at the front.
    ports: OrderedDict[int, Event] = field(default_factory=OrderedDict)
    last_ns: int = 0
    quiet_until_ns: int = 0


class Tracker:
    """The detection itself, free of the hive so that it can be tested alone.

    Args:
        settings: thresholds and limits.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.window_ns = int(settings.window * 1e9)
        self.ignored_networks = settings.networks()
        self.ignored_exes = frozenset(settings.ignore_exes)
        self._probes: OrderedDict[tuple[str, str, str], _Probe] = OrderedDict()
        #: Triples dropped to stay within ``max_tracked`` (not idle ones).
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._probes)

    def observe(self, event: Event) -> Finding | None:
        """Count one connect event; return a finding when it completes a scan."""
        addr = self._destination(event)
        if addr is None or event.port is None:
            return None
        key = (event.agent_id, _process(event), addr)
        probe = self._probes.pop(key, None) or _Probe()
        self._probes[key] = probe  # now the most recently active
        probe.last_ns = max(probe.last_ns, event.ts)
        self._forget(event.ts)

        if event.ts < probe.quiet_until_ns:
            return None
        probe.ports.pop(event.port, None)
        probe.ports[event.port] = event
        self._expire_ports(probe, event.ts)
        if len(probe.ports) < self.settings.threshold:
            return None

        events = tuple(sorted(probe.ports.values(), key=lambda e: e.ts))
        probe.ports.clear()
        probe.quiet_until_ns = event.ts + self.window_ns
        return Finding(event.agent_id, key[1], addr, events)

    def _destination(self, event: Event) -> str | None:
        """The normalised remote address, or None when not to be counted."""
        if event.kind != "connect" or event.family == "unix" or not event.port:
            return None
        if not event.addr or (event.exe and event.exe in self.ignored_exes):
            return None
        try:
            ip: Address = ipaddress.ip_address(event.addr)
        except ValueError:
            return event.addr  # not an IP (a sensor's name for it): count as is
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:192.0.2.1 is 192.0.2.1
        if any(ip in net for net in self.ignored_networks):
            return None
        return str(ip)

    def _expire_ports(self, probe: _Probe, now_ns: int) -> None:
        horizon = now_ns - self.window_ns
        while probe.ports:
            oldest = next(iter(probe.ports.values()))
            if oldest.ts >= horizon:
                break
            probe.ports.popitem(last=False)

    def _forget(self, now_ns: int) -> None:
        # Idle triples first (least recently active at the front), then the
        # oldest of the rest if there are still too many.
        horizon = now_ns - self.window_ns
        while self._probes:
            probe = next(iter(self._probes.values()))
            if probe.last_ns >= horizon or probe.quiet_until_ns > now_ns:
                break
            self._probes.popitem(last=False)
        while len(self._probes) > self.settings.max_tracked:
            self._probes.popitem(last=False)
            self.evicted += 1


def _process(event: Event) -> str:
    """Who connected: the pid, or what names the program when there is none."""
    if event.pid is not None:
        return str(event.pid)
    return event.exe or event.comm or "?"


class PortScanPlugin:
    """Raises an alert when a process connects to many ports of one address."""

    def __init__(self) -> None:
        self.hive: Hive | None = None
        self.settings = Settings()
        self.tracker = Tracker(self.settings)

    @hookimpl
    def immune_describe(self) -> dict[str, str]:
        return {
            "description": "port scans: many ports of one address from one process",
            "version": __version__,
        }

    @hookimpl
    def immune_configure(self, hive: Hive, config: dict[str, Any]) -> None:
        self.settings = Settings.from_table(config)
        self.tracker = Tracker(self.settings)
        self.hive = hive

    @hookimpl
    def immune_subscriptions(self) -> list[tuple[str, Any]]:
        return [("event.connect", self.on_connect)]

    @hookimpl
    def immune_stop(self) -> None:
        logger.info(
            "Tracked %d process/address pairs at stop; %d evicted to stay bounded.",
            len(self.tracker),
            self.tracker.evicted,
        )

    async def on_connect(self, event: Event) -> None:
        """Count one connect and raise an alert when it completes a scan."""
        assert self.hive is not None, "immune_configure sets the hive"
        finding = self.tracker.observe(event)
        self.hive.metrics.set(f"{NAME}.tracked", len(self.tracker))
        if finding is None:
            return
        logger.debug(
            "Scan of %s by process %s on %s.",
            printable(finding.addr),
            printable(finding.process),
            finding.agent_id,
        )
        self.hive.metrics.inc(f"{NAME}.scans")
        await self.hive.raise_alert(
            rule=RULE,
            title=f"Port scan of {finding.addr} by {_program(finding.events[-1])}",
            severity=self.settings.severity,
            plugin=NAME,
            events=finding.events,
            techniques=TECHNIQUES,
            description=(
                f"{len(finding.events)} distinct ports of {finding.addr} within "
                f"{self.settings.window:g} s from one process."
            ),
            data=_alert_data(finding, self.settings),
        )


def _program(event: Event) -> str:
    if event.comm:
        return event.comm
    if event.exe:
        return event.exe.rsplit("/", 1)[-1]
    return f"pid {event.pid}" if event.pid is not None else "an unknown process"


def _alert_data(finding: Finding, settings: Settings) -> dict[str, Any]:
    last = finding.events[-1]
    data: dict[str, Any] = {
        "addr": finding.addr,
        "ports": finding.ports,
        "threshold": settings.threshold,
        "window": settings.window,
    }
    for name in ("pid", "ppid", "uid", "comm", "exe"):
        value = getattr(last, name)
        if value is not None:
            data[name] = value
    return data
