"""CLI inputs that once ended in a traceback or showed a password."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import orjson
import pytest
from sqlalchemy.engine import make_url

from clirun import run_immune as run
from immune.cli import parse_since
from immune.events import Event, new_id, now_ns
from immune.storage import Store


def seed(db: Path) -> str:
    event = Event(id=new_id(), agent_id="web-1", host="web-1", ts=now_ns(), kind="exec")

    async def write() -> None:
        store = Store(f"sqlite:///{db}")
        store.upgrade()
        async with store:
            await store.add_events([event])

    asyncio.run(write())
    return event.id


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("since", ["1000000d", "99999999999999999999m", "0001-01-01"])
def test_cli_since_before_1970_shows_everything(tmp_path: Path, since: str) -> None:
    # These bounds did not fit a 64-bit integer: OverflowError from SQLite.
    event_id = seed(tmp_path / "immune.db")
    result = run("events", "--json", "--since", since, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [orjson.loads(x)["id"] for x in result.stdout.splitlines()] == [event_id]


def test_cli_parse_since_stays_within_64_bits() -> None:
    assert parse_since("1000000d") == 0
    assert parse_since("0001-01-01T00:00:00+00:00") == 0
    assert parse_since("9999-12-31") == 2**63 - 1  # later than ns fit in 64 bits
    assert parse_since("2200-01-01T00:00:00+00:00") == 7258118400 * 10**9


def test_cli_unknown_kind_is_an_error_naming_the_kinds(tmp_path: Path) -> None:
    seed(tmp_path / "immune.db")
    line = error_line(run("events", "--kind", "rootkit", cwd=tmp_path))
    assert line.startswith("error: --kind must be one of exec, fork, exit,")


def test_cli_unparsable_database_url_is_one_line(tmp_path: Path) -> None:
    env = {"IMMUNE_HIVE__DATABASE": "garbage"}
    line = error_line(run("events", cwd=tmp_path, env=env))
    assert line == "error: invalid database URL 'garbage' in [hive] database"


@pytest.mark.parametrize("command", [["db", "upgrade"], ["hive"]])
def test_cli_unreachable_database_is_one_line(
    tmp_path: Path, command: list[str]
) -> None:
    url = f"sqlite:///{tmp_path}/no/such/dir/x.db"
    env = {"IMMUNE_HIVE__DATABASE": url, "IMMUNE_MQTT__URL": "mqtt://127.0.0.1:1"}
    line = error_line(run(*command, cwd=tmp_path, env=env))
    assert line.startswith("error: cannot upgrade the database of Store(")
    assert line.endswith("OperationalError: unable to open database file")


@pytest.mark.postgres
def test_cli_db_upgrade_does_not_print_the_password(
    tmp_path: Path, pg_url: str
) -> None:
    # The server here trusts local connections, so any password does; where
    # the test URL has a real one, that one is used and must not show either.
    parsed = make_url(pg_url)
    secret = parsed.password or "not-for-the-eyes"
    url = parsed.set(password=secret).render_as_string(hide_password=False)
    result = run("db", "upgrade", cwd=tmp_path, env={"IMMUNE_HIVE__DATABASE": url})
    assert result.returncode == 0, result.stderr
    assert "is up to date" in result.stdout
    assert secret not in result.stdout + result.stderr
    assert ":***@" in result.stdout
