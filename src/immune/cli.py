"""The ``immune`` command.

Commands are thin: they parse options, call plain functions, and print. An
:class:`~immune.errors.ImmuneError` becomes one red line and exit status 1
(with the traceback only under ``--verbose``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from immune import __version__, cli_rules, cli_sigma
from immune import config as config_mod
from immune.cli_pki import app as pki_app
from immune.cli_response import response_app as _response_app
from immune.config import Config
from immune.errors import ConfigError, ImmuneError, StorageError
from immune.events import KINDS, SEVERITIES
from immune.safe import printable

app = typer.Typer(
    name="immune",
    help="IMMUNE: endpoint detection and response, with an event hive.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
db_app = typer.Typer(help="Manage the database.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(cli_sigma.app, name="sigma")
app.add_typer(_response_app, name="response")
app.add_typer(pki_app, name="pki")
app.add_typer(cli_rules.app, name="rules")

console = Console()
err_console = Console(stderr=True)


class _State:
    config_path: Path | None = None
    verbose = False


state = _State()


def _version(value: bool) -> None:
    if value:
        console.print(f"immune {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="TOML configuration file.", envvar="IMMUNE_CONFIG"
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug logging.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version."
        ),
    ] = False,
) -> None:
    """IMMUNE: endpoint detection and response, with an event hive."""
    state.config_path = config
    state.verbose = verbose
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, markup=False)],
    )
    if not verbose:
        # Alembic narrates every migration step at INFO.
        logging.getLogger("alembic").setLevel(logging.WARNING)


def _config() -> Config:
    return config_mod.load(state.config_path)


# -- long-running commands ----------------------------------------------------


@app.command()
def up() -> None:
    """Run the main job: the hive and this host's agent, with a live status.

    Uses the configured MQTT broker if it answers, else starts Mosquitto (or,
    where it is not installed, a built-in broker). Stores into SQLite in the
    working directory unless configured otherwise.
    """
    from immune.runner import run_up

    asyncio.run(run_up(_config(), console))


@app.command()
def hive() -> None:
    """Run the hive alone, taking events from the configured MQTT broker."""
    from immune.runner import run_hive

    asyncio.run(run_hive(_config()))


@app.command()
def agent() -> None:
    """Run this host's agent, publishing to the configured MQTT broker."""
    from immune.runner import run_agent

    asyncio.run(run_agent(_config()))


# -- queries ------------------------------------------------------------------

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str | None) -> int | None:
    """``10m``, ``2h``, ``1d``, ``30s`` ago, or an ISO 8601 time, as ns."""
    if text is None:
        return None
    match = _DURATION.match(text.strip())
    if match:
        seconds = float(match.group(1)) * _UNIT[match.group(2)]
        # Longer ago than 1970 means everything (and keeps the bound an int
        # every database takes).
        return max(0, time.time_ns() - int(seconds * 1e9))
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        msg = f"--since {text!r}: use a duration like 10m, 2h, 1d or an ISO time"
        raise ConfigError(msg) from None
    try:
        ns = int(when.timestamp() * 1e9)
    except (OverflowError, OSError, ValueError):
        ns = 0 if when.year < 1970 else 2**63 - 1  # beyond what the clock takes
    return min(max(0, ns), 2**63 - 1)


def _store() -> Any:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from immune.storage import Store

    cfg = _config()
    try:
        url = make_url(cfg.hive.database)
    except ArgumentError:
        msg = (
            f"invalid database URL {printable(cfg.hive.database)!r} in [hive] database"
        )
        raise StorageError(msg) from None
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").exists():
        # Reading must not leave an empty database file behind.
        msg = (
            f"no database at {url.database}: start the hive (`immune up`) or run "
            "`immune db upgrade` first"
        )
        raise StorageError(msg)
    store = Store(cfg.hive.database, config=cfg.storage)
    store.check_ready()
    return store


def _when(ns: int | None) -> str:
    if not ns:
        return ""
    return datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _print_rows(rows: list[dict[str, Any]], columns: list[str], as_json: bool) -> None:
    if as_json:
        for row in rows:
            sys.stdout.write(orjson.dumps(row).decode() + "\n")
        return
    table = Table(header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            if column == "ts" or column.endswith("_seen") or column == "received_at":
                value = _when(value)
            elif isinstance(value, list):
                value = " ".join(map(str, value))
            cells.append(escape(printable("" if value is None else value, 300)))
        table.add_row(*cells)
    console.print(table)
    if not rows:
        err_console.print("No rows match.")


def describe_event(row: dict[str, Any]) -> str:
    """The gist of an event in a few words, for the table view."""
    kind = row.get("kind")
    if kind == "exec":
        argv = row.get("argv") or []
        return " ".join(argv) if argv else row.get("exe") or "?"
    if kind in ("connect", "bind"):
        return f"{row.get('addr') or '?'} port {row.get('port')}"
    if kind == "open":
        return row.get("path") or "?"
    if kind == "setuid":
        return f"euid {row.get('old_euid', '?')} -> {row.get('euid')}"
    if kind == "fork":
        return f"child of {row.get('ppid')}"
    if kind == "exit":
        return f"{row.get('comm') or ''} exit {row.get('exit_code', '?')}".strip()
    return row.get("comm") or ""


Limit = Annotated[int, typer.Option("--limit", "-n", min=1, help="Rows to show.")]
Json = Annotated[bool, typer.Option("--json", help="One JSON object per line.")]
Since = Annotated[
    str | None, typer.Option("--since", help="Only newer: 10m, 2h, 1d or an ISO time.")
]
AgentOpt = Annotated[str | None, typer.Option("--agent", help="Only this agent id.")]


@app.command()
def events(
    kind: Annotated[
        str | None, typer.Option("--kind", help="exec, connect, ...")
    ] = None,
    agent: AgentOpt = None,
    since: Since = None,
    exe: Annotated[
        str | None, typer.Option("--exe", help="Only this executable (full path).")
    ] = None,
    pid: Annotated[
        int | None, typer.Option("--pid", min=0, help="Only this process id.")
    ] = None,
    limit: Limit = 50,
    as_json: Json = False,
) -> None:
    """Show stored events, newest first."""
    if kind is not None and kind not in KINDS:
        raise ConfigError(f"--kind must be one of {', '.join(KINDS)}")
    since_ns = parse_since(since)
    store = _store()
    try:
        rows = store.events(
            kind=kind, agent_id=agent, since_ns=since_ns, exe=exe, pid=pid, limit=limit
        )
    finally:
        store.close()
    if not as_json:
        for row in rows:
            row["what"] = describe_event(row)
    _print_rows(rows, ["ts", "host", "kind", "pid", "uid", "what"], as_json)


@app.command()
def alerts(
    severity: Annotated[
        str | None,
        typer.Option("--severity", help="At least: low, medium, high, critical."),
    ] = None,
    agent: AgentOpt = None,
    since: Since = None,
    limit: Limit = 50,
    as_json: Json = False,
) -> None:
    """Show alerts, newest first."""
    if severity is not None and severity not in SEVERITIES:
        raise ConfigError(f"--severity must be one of {', '.join(SEVERITIES)}")
    since_ns = parse_since(since)
    store = _store()
    try:
        rows = store.alerts(
            min_severity=severity, agent_id=agent, since_ns=since_ns, limit=limit
        )
    finally:
        store.close()
    _print_rows(
        rows,
        ["ts", "severity", "host", "rule", "title", "count"],
        as_json,
    )


@app.command()
def deadletters(limit: Limit = 50, as_json: Json = False) -> None:
    """Show input the hive refused, with the reason."""
    store = _store()
    try:
        rows = store.dead_letters(limit=limit)
    finally:
        store.close()
    for row in rows:
        row.pop("payload", None)
    _print_rows(rows, ["received_at", "source", "reason", "payload_size"], as_json)


@app.command()
def plugins(as_json: Json = False) -> None:
    """List installed plugins, where they come from, their topics and state."""
    from immune.hive import Hive

    hive_ = Hive(_config())
    infos = asyncio.run(hive_.describe_plugins())
    _print_rows(
        [i.as_dict() for i in infos],
        ["name", "state", "topics", "origin", "description", "error"],
        as_json,
    )


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply database migrations up to the latest."""
    from immune.storage import Store

    cfg = _config()
    store = Store(cfg.hive.database, config=cfg.storage)
    try:
        store.upgrade()
    finally:
        store.close()
    # The URL may hold a password: show it the way the store does, without.
    shown = store.url.render_as_string(hide_password=True)
    console.print(f"Database {printable(shown)} is up to date.")


from immune.cli_replay import replay  # noqa: E402  (it imports this module)

app.command()(replay)


def main() -> None:
    """Entry point: run the app, turning IMMUNE's errors into one line."""
    try:
        app()
    except ImmuneError as exc:
        if state.verbose:
            err_console.print_exception()
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
