"""sentinel_bridge: decides which alerts are worth asking ``sentinel`` about.

An external verdict service is slow and costs money per question, so each
alert is screened at the edge first. It is worth asking about when one of
its indicators (address, executable, path, hash, domain) is in the Bloom
filter of known-bad indicators, when its command line holds a suspicious
substring or looks encoded (Shannon entropy above 4.5 bits per byte on more
than 50 bytes), or when it is severe enough by itself. An alert whose
indicators got a verdict less than five minutes ago gets that verdict again
from the cache, without a question.

What is worth asking goes out on ``sentinel.request``; cached verdicts on
``verdict.<action>``, like the service's own.

Configuration (``[plugins.sentinel_bridge]``)::

    indicators = ["203.0.113.7", "evil.example"]   # known bad, any kind
    indicator_files = ["/etc/immune/bad.txt"]      # one per line, # comments
    capacity = 10000        # Bloom filter size, in indicators
    false_positive_rate = 0.01
    substrings = [...]      # replaces the default list
    entropy_threshold = 4.5
    entropy_min_bytes = 50
    min_severity = "high"   # alerts this severe are always worth asking
    cache_size = 1000
    cache_ttl_s = 300
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import rbloom
from cachetools import TTLCache

from immune.events import SEVERITY_RANK, Alert
from immune.hookspecs import hookimpl

if TYPE_CHECKING:
    from immune.hive import Hive

logger = logging.getLogger(__name__)

#: Pieces of command lines and paths that droppers, shells and miners use.
SUSPICIOUS = (
    "/dev/tcp/",
    "/dev/udp/",
    "base64 -d",
    "base64 --decode",
    "| sh",
    "|sh",
    "| bash",
    "nc -e",
    "ncat -e",
    "mkfifo",
    "socat exec:",
    "chmod +x /tmp",
    "chmod 777",
    "ld_preload=",
    "/etc/shadow",
    ".ssh/authorized_keys",
    "crontab -",
    "history -c",
    "unset histfile",
    "xmrig",
    "stratum+tcp",
    "${jndi:",
    "python -c 'import socket",
    "wget http",
    "curl http",
)
#: Alert data keys that hold indicators.
INDICATOR_KEYS = ("addr", "exe", "path", "sha256", "domain", "comm", "cmdline")
_SETTINGS = {
    "indicators",
    "indicator_files",
    "capacity",
    "false_positive_rate",
    "substrings",
    "entropy_threshold",
    "entropy_min_bytes",
    "min_severity",
    "cache_size",
    "cache_ttl_s",
}
REQUEST = "sentinel.request"


def shannon_entropy(data: bytes) -> float:
    """Bits of information per byte of ``data`` (0 to 8)."""
    if not data:
        return 0.0
    total = len(data)
    return -sum(n / total * math.log2(n / total) for n in Counter(data).values())


def bloom_bits(capacity: int, rate: float) -> int:
    """The optimal size in bits of a Bloom filter: -n ln p / (ln 2)^2."""
    return math.ceil(-capacity * math.log(rate) / math.log(2) ** 2)


def normalise(indicator: str) -> str:
    return indicator.strip().lower()


class KnownBad:
    """A Bloom filter of known-bad indicators: no false negatives, and false
    positives at about the configured rate while within capacity."""

    def __init__(self, capacity: int = 10_000, rate: float = 0.01) -> None:
        self.capacity, self.rate = capacity, rate
        self.bloom = rbloom.Bloom(capacity, rate)
        self.count = 0

    def add(self, indicator: str) -> None:
        self.bloom.add(normalise(indicator))
        self.count += 1
        if self.count == self.capacity + 1:
            logger.warning(
                "More than %d known-bad indicators: false positives will rise "
                "above %.2f%%; raise capacity.",
                self.capacity,
                self.rate * 100,
            )

    def __contains__(self, indicator: str) -> bool:
        return normalise(indicator) in self.bloom


def read_indicators(path: str | Path) -> list[str]:
    """Indicators of a file, one a line; blank lines and ``#`` comments skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()]


def indicators_of(alert: Alert) -> dict[str, str]:
    """The alert's indicators, by kind, as strings."""
    found = {}
    for key in INDICATOR_KEYS:
        value = alert.data.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool) and value != "":
            found[key] = str(value)
    return found


def cache_key(alert: Alert, indicators: dict[str, str]) -> str:
    """What makes two alerts the same question."""
    text = "\x00".join(
        [alert.rule, *(f"{k}={v}" for k, v in sorted(indicators.items()))]
    )
    return hashlib.sha256(text.encode()).hexdigest()


class SentinelBridgePlugin:
    """The edge pre-filter in front of ``sentinel``."""

    name = "sentinel_bridge"

    def __init__(self) -> None:
        self.hive: Hive
        self.known_bad = KnownBad()
        self.substrings: tuple[str, ...] = SUSPICIOUS
        self.entropy_threshold = 4.5
        self.entropy_min_bytes = 50
        self.min_rank = SEVERITY_RANK["high"]
        self.cache: TTLCache[str, dict[str, Any]] = TTLCache(1000, 300)

    @hookimpl
    def immune_describe(self) -> dict[str, str]:
        count = self.known_bad.count
        return {"description": f"verdict pre-filter; {count} known-bad indicators"}

    @hookimpl
    def immune_configure(self, hive: Hive, config: dict[str, Any]) -> None:
        self.hive = hive
        unknown = set(config) - _SETTINGS
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}; known: {_SETTINGS}")
        self.known_bad = KnownBad(
            int(config.get("capacity", 10_000)),
            float(config.get("false_positive_rate", 0.01)),
        )
        for indicator in config.get("indicators", []):
            self.known_bad.add(str(indicator))
        for path in config.get("indicator_files", []):
            for indicator in read_indicators(path):
                self.known_bad.add(indicator)
        self.substrings = tuple(s.lower() for s in config.get("substrings", SUSPICIOUS))
        self.entropy_threshold = float(config.get("entropy_threshold", 4.5))
        self.entropy_min_bytes = int(config.get("entropy_min_bytes", 50))
        severity = config.get("min_severity", "high")
        if severity not in SEVERITY_RANK:
            raise ValueError(f"min_severity must be one of {', '.join(SEVERITY_RANK)}")
        self.min_rank = SEVERITY_RANK[severity]
        self.cache = TTLCache(
            int(config.get("cache_size", 1000)), float(config.get("cache_ttl_s", 300))
        )

    @hookimpl
    def immune_subscriptions(self) -> list[tuple[str, Any]]:
        return [("alert.#", self.on_alert), ("verdict.*", self.on_verdict)]

    def reasons(self, alert: Alert, indicators: dict[str, str]) -> list[str]:
        """Why the alert is worth asking about; empty when it is not."""
        found = [f"known-bad {k}" for k, v in indicators.items() if v in self.known_bad]
        text = " ".join(indicators.get(k, "") for k in ("cmdline", "path", "exe"))
        lowered = text.lower()
        found += [f"substring {s!r}" for s in self.substrings if s in lowered]
        cmdline = indicators.get("cmdline", "").encode()
        if len(cmdline) > self.entropy_min_bytes:
            entropy = shannon_entropy(cmdline)
            if entropy > self.entropy_threshold:
                found.append(f"entropy {entropy:.2f}")
        if SEVERITY_RANK[alert.severity] >= self.min_rank:
            found.append(f"severity {alert.severity}")
        return found

    async def on_alert(self, alert: Alert) -> None:
        """Answer from the cache, ask sentinel, or let the alert be."""
        metrics = self.hive.metrics
        indicators = indicators_of(alert)
        key = cache_key(alert, indicators)
        cached = self.cache.get(key)
        if cached is not None:
            metrics.inc("sentinel_bridge.cache_hits")
            verdict = {**cached, "alert": alert, "source": "cache"}
            await self.hive.publish(f"verdict.{verdict['action']}", verdict)
            return
        reasons = self.reasons(alert, indicators)
        if not reasons:
            metrics.inc("sentinel_bridge.skipped")
            return
        metrics.inc("sentinel_bridge.asked")
        request = {"alert": alert, "indicators": indicators, "reasons": reasons}
        await self.hive.publish(REQUEST, {**request, "key": key})

    def on_verdict(self, verdict: dict[str, Any]) -> None:
        """Keep the service's verdicts (not fallbacks) for the same question."""
        key = verdict.get("key") if isinstance(verdict, dict) else None
        if isinstance(key, str) and verdict.get("source") == "service":
            self.cache[key] = {k: v for k, v in verdict.items() if k != "alert"}
