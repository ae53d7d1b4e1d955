"""The alert channels also carry the notices of playbooks."""

from __future__ import annotations

from pathlib import Path

import orjson
from response_kit import alert, make_hive, until

from immune.plugins.alert import AlertPlugin, format_notice
from immune.plugins.playbook import PlaybookPlugin


def test_alert_notice_line_is_escaped() -> None:
    note = {
        "playbook": "p",
        "severity": "high",
        "message": "Shell\n[2026-01-01 00:00:00] [INFO] forged\x1b[2J",
        "agents": ["web-1"],
        "alert_id": "a1",
        "dry_run": True,
    }
    line = format_notice(note)
    assert "\n" not in line and "\x1b" not in line
    assert "[HIGH] p (dry-run): Shell\\n[2026-01-01" in line
    assert line.endswith("[web-1] (alert a1)")


async def test_alert_playbook_notice_reaches_the_file(
    tmp_path: Path, sqlite_url: str
) -> None:
    log = tmp_path / "alerts.log"
    hive = make_hive(
        sqlite_url,
        [("alert", AlertPlugin()), ("playbook", PlaybookPlugin())],
        alert={"console": False, "file": str(log), "min_severity": "medium"},
        playbook={},
    )
    async with hive:
        crit = alert(severity="critical", rule="lab")
        await hive.publish(crit.topic, crit)
        await until(lambda: log.exists() and len(log.read_bytes().splitlines()) == 2)
        await hive.publish("notify.low", {"severity": "low", "message": "quiet"})
        await hive.publish("notify.high", "not a notice")
        await hive.bus.join()
    lines = [orjson.loads(line) for line in log.read_bytes().splitlines()]
    assert lines[0]["id"] == crit.id  # the alert itself
    assert lines[1]["playbook"] == "critical-isolate" and lines[1]["dry_run"] is True
    assert len(lines) == 2  # below min_severity, or not a notice: left out
    hive.store.close()
