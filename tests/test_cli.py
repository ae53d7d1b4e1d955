"""The immune command: options, queries, errors as one line."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from clirun import run_immune as run
from immune import __version__
from immune.cli import parse_since
from immune.errors import ConfigError
from immune.events import Alert, Event, new_id, now_ns
from immune.storage import Store


def seed(db: Path) -> list[Event]:
    events = [
        Event(
            id=new_id(),
            agent_id="web-1",
            host="web-1",
            ts=now_ns(),
            kind="exec",
            pid=10,
            exe="/tmp/x",
            argv=["/tmp/x", "\x1b[31mred"],
        ),
        Event(
            id=new_id(),
            agent_id="db-2",
            host="db-2",
            ts=now_ns(),
            kind="setuid",
            pid=11,
            euid=0,
            old_euid=1000,
        ),
    ]
    alert = Alert(
        id=new_id(),
        ts=now_ns(),
        rule="exec-from-temp-dir",
        title="T",
        severity="high",
        plugin="exploit",
        agent_id="web-1",
        host="web-1",
    )

    async def write() -> None:
        store = Store(f"sqlite:///{db}")
        store.upgrade()
        async with store:
            await store.add_events(events)
            await store.add_alert(alert)

    asyncio.run(write())
    return events


def test_cli_version(tmp_path: Path) -> None:
    result = run("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"immune {__version__}"


def test_cli_events_json_filters_by_kind_and_agent(tmp_path: Path) -> None:
    events = seed(tmp_path / "immune.db")
    result = run("events", "--json", "--kind", "exec", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in rows] == [events[0].id]
    result = run("events", "--json", "--agent", "db-2", cwd=tmp_path)
    assert [orjson.loads(x)["kind"] for x in result.stdout.splitlines()] == ["setuid"]


def test_cli_events_json_filters_by_exe_and_pid(tmp_path: Path) -> None:
    events = seed(tmp_path / "immune.db")
    result = run("events", "--json", "--exe", "/tmp/x", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [orjson.loads(x)["id"] for x in result.stdout.splitlines()] == [events[0].id]
    result = run("events", "--json", "--pid", "11", cwd=tmp_path)
    assert [orjson.loads(x)["id"] for x in result.stdout.splitlines()] == [events[1].id]
    result = run("events", "--json", "--exe", "/tmp", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout == ""


def test_cli_events_table_escapes_terminal_control_characters(tmp_path: Path) -> None:
    seed(tmp_path / "immune.db")
    result = run("events", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "\x1b[31m" not in result.stdout
    assert "\\x1b[31mred" in result.stdout
    assert "euid 1000 -> 0" in result.stdout


def test_cli_alerts_filter_by_severity(tmp_path: Path) -> None:
    seed(tmp_path / "immune.db")
    high = run("alerts", "--json", "--severity", "high", cwd=tmp_path)
    critical = run("alerts", "--json", "--severity", "critical", cwd=tmp_path)
    assert [orjson.loads(x)["rule"] for x in high.stdout.splitlines()] == [
        "exec-from-temp-dir"
    ]
    assert critical.stdout == ""


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["alerts", "--severity", "huge"], {}, "--severity must be one of"),
        (["events", "--since", "yesterday"], {}, "use a duration like 10m"),
        (["events"], {"IMMUNE_HIVE__BUS_SHARDS": "0"}, "invalid configuration"),
        (["--config", "missing.toml", "events"], {}, "missing.toml does not exist"),
        (
            ["events"],
            {"IMMUNE_HIVE__DATABASE": "sqlite:///nowhere.db"},
            "immune db upgrade",
        ),
    ],
)
def test_cli_errors_are_one_line_and_exit_1(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    result = run(*args, cwd=tmp_path, env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "nowhere.db").exists()  # a query creates nothing


def test_cli_bad_toml_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "immune.toml").write_text("[hive\n")
    result = run("events", cwd=tmp_path)
    assert result.returncode == 1
    assert "immune.toml is not valid TOML" in result.stderr


def test_cli_db_upgrade_then_plugins_listing(tmp_path: Path) -> None:
    result = run("db", "upgrade", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "immune.db").exists()
    result = run(
        "plugins",
        "--json",
        cwd=tmp_path,
        env={"IMMUNE_HIVE__DISABLED_PLUGINS": '["alert"]'},
    )
    plugins = {p["name"]: p for p in map(orjson.loads, result.stdout.splitlines())}
    assert plugins["alert"]["state"] == "disabled"
    assert plugins["exploit"]["state"] == "loaded"
    assert "event.exec" in plugins["exploit"]["topics"]
    assert plugins["network"]["origin"].startswith("entry point")


def test_cli_parse_since() -> None:
    now = now_ns()
    assert abs(parse_since("10m") - (now - 600 * 10**9)) < 5 * 10**9
    assert parse_since("2026-01-01T00:00:00+00:00") == 1767225600 * 10**9
    assert parse_since(None) is None
    with pytest.raises(ConfigError):
        parse_since("soon")
