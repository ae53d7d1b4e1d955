"""sentinel_bridge: Bloom filter, entropy, substrings, verdict cache."""

from __future__ import annotations

import asyncio
import base64
import math
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from response_kit import alert, make_hive, until

from immune.plugins.sentinel_bridge import (
    KnownBad,
    SentinelBridgePlugin,
    bloom_bits,
    read_indicators,
    shannon_entropy,
)


def test_sentinel_bridge_bloom_size_follows_the_formula() -> None:
    bits = bloom_bits(10_000, 0.01)
    # m = -n ln p / (ln 2)^2 = 95,851 bits for the reference 10,000 at 1 %.
    assert bits == math.ceil(10_000 * math.log(100) / math.log(2) ** 2) == 95_851
    assert abs(KnownBad(10_000, 0.01).bloom.size_in_bits - bits) <= 64


def test_sentinel_bridge_bloom_false_positive_rate_is_about_one_percent() -> None:
    known = KnownBad(10_000, 0.01)
    members = [uuid.uuid4().hex for _ in range(10_000)]
    for item in members:
        known.add(item)
    assert all(item in known for item in members)  # never a false negative
    others = [uuid.uuid4().hex for _ in range(100_000)]
    rate = sum(item in known for item in others) / len(others)
    assert 0.004 < rate < 0.016, rate


def test_sentinel_bridge_indicators_are_matched_case_insensitively() -> None:
    known = KnownBad(100, 0.01)
    known.add(" Evil.Example ")
    assert "evil.example" in known and "EVIL.EXAMPLE" in known
    assert "good.example" not in known


def test_sentinel_bridge_entropy() -> None:
    assert shannon_entropy(b"") == 0.0
    assert shannon_entropy(b"aaaaaaaa") == 0.0
    assert shannon_entropy(b"abab") == 1.0
    assert shannon_entropy(bytes(range(256))) == 8.0
    encoded = base64.b64encode(os.urandom(300))
    assert shannon_entropy(encoded) > 4.5
    plain = b"ls -la /home/user/documents/projects/immune/src/immune/plugins"
    assert len(plain) > 50 and shannon_entropy(plain) < 4.5


def test_sentinel_bridge_reads_indicator_files(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_text("# feed\n203.0.113.7\n\nevil.example  # C2\n", encoding="utf-8")
    assert read_indicators(path) == ["203.0.113.7", "evil.example"]


def plugin(tmp_path: Path, **config: Any) -> SentinelBridgePlugin:
    bridge = SentinelBridgePlugin()
    hive = make_hive(f"sqlite:///{tmp_path / 'x.db'}", [])
    bridge.immune_configure(hive, config)
    return bridge


@pytest.mark.parametrize(
    ("data", "severity", "expected"),
    [
        ({"addr": "203.0.113.7"}, "low", "known-bad addr"),
        ({"exe": "/tmp/XMRig"}, "low", "substring 'xmrig'"),
        ({"cmdline": "bash -c 'echo aGVsbG8= | base64 -d | sh'"}, "low", "base64 -d"),
        (
            {"cmdline": "python3 -c " + base64.b64encode(os.urandom(120)).decode()},
            "low",
            "entropy",
        ),
        ({}, "high", "severity high"),
    ],
)
def test_sentinel_bridge_reasons_to_ask(
    tmp_path: Path, data: dict[str, Any], severity: str, expected: str
) -> None:
    bridge = plugin(tmp_path, indicators=["203.0.113.7"])
    reasons = bridge.reasons(alert(severity=severity, data=data), data)
    assert any(expected in reason for reason in reasons), reasons


def test_sentinel_bridge_benign_alert_is_not_worth_asking(tmp_path: Path) -> None:
    bridge = plugin(tmp_path, indicators=["203.0.113.7"])
    data = {"addr": "198.51.100.1", "cmdline": "ls -la /srv/www/site/static/images"}
    assert bridge.reasons(alert(severity="medium", data=data), data) == []


def test_sentinel_bridge_unknown_setting_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown settings"):
        plugin(tmp_path, bloom=1)


async def test_sentinel_bridge_asks_skips_and_answers_from_cache(
    sqlite_url: str,
) -> None:
    bridge = SentinelBridgePlugin()
    hive = make_hive(
        sqlite_url,
        [("sentinel_bridge", bridge)],
        sentinel_bridge={"indicators": ["203.0.113.7"], "cache_ttl_s": 0.3},
    )
    asked: list[dict[str, Any]] = []
    verdicts: list[dict[str, Any]] = []
    hive.bus.subscribe("sentinel.request", asked.append)
    hive.bus.subscribe("verdict.*", verdicts.append)
    async with hive:
        bad = alert(data={"addr": "203.0.113.7"})
        await hive.publish(bad.topic, bad)
        await until(lambda: asked)
        assert asked[0]["reasons"] == ["known-bad addr"]
        fine = alert(data={"addr": "198.51.100.1"})
        await hive.publish(fine.topic, fine)
        await until(lambda: hive.metrics.get("sentinel_bridge.skipped") == 1)

        # The service answers; the same question again is answered from cache.
        answer = {"action": "block", "risk": 0.8, "key": asked[0]["key"]}
        await hive.publish("verdict.block", {**answer, "source": "service"})
        again = alert(data={"addr": "203.0.113.7"})
        await hive.publish(again.topic, again)
        await until(lambda: len(verdicts) == 2)
        assert verdicts[1]["source"] == "cache" and verdicts[1]["alert"].id == again.id
        assert verdicts[1]["action"] == "block" and len(asked) == 1

        await asyncio.sleep(0.35)  # the cached verdict expires
        late = alert(data={"addr": "203.0.113.7"})
        await hive.publish(late.topic, late)
        await until(lambda: len(asked) == 2)
        assert hive.metrics.get("sentinel_bridge.cache_hits") == 1
    hive.store.close()
