"""``immune response``: playbook runs, the commands they sent, and checks.

Kept apart from :mod:`immune.cli`, which adds it with one ``add_typer`` line;
the helpers it shares with the other commands are imported when a command
runs, since :mod:`immune.cli` imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from immune.playbooks import PlaybookError, load_file, playbook_files

response_app = typer.Typer(
    help="Playbook runs and the commands they sent.", no_args_is_help=True
)

Limit = Annotated[int, typer.Option("--limit", "-n", min=1, help="Rows to show.")]
Json = Annotated[bool, typer.Option("--json", help="One JSON object per line.")]


def summary(commands: list[dict[str, Any]]) -> str:
    """``isolate@web-1:succeeded kill@web-1:failed`` for a run's commands."""
    return " ".join(f"{c['action']}@{c['agent_id']}:{c['state']}" for c in commands)


@response_app.command("runs")
def runs(
    playbook: Annotated[
        str | None, typer.Option("--playbook", help="Only this playbook id.")
    ] = None,
    limit: Limit = 50,
    as_json: Json = False,
) -> None:
    """Show playbook runs (and automatic decisions), newest first."""
    from immune.cli import _print_rows, _store

    store = _store()
    try:
        rows = store.runs(playbook=playbook, limit=limit)
    finally:
        store.close()
    if not as_json:
        for row in rows:
            row["ts"] = row["started"]
            row["mode"] = "dry-run" if row["dry_run"] else "live"
            row["commands"] = summary(row["commands"])
    columns = ["ts", "playbook", "state", "mode", "rule", "agents", "commands"]
    _print_rows(rows, columns, as_json)


@response_app.command("commands")
def commands(
    agent: Annotated[
        str | None, typer.Option("--agent", help="Only this agent id.")
    ] = None,
    state: Annotated[
        str | None, typer.Option("--state", help="sent, succeeded, failed, ...")
    ] = None,
    limit: Limit = 50,
    as_json: Json = False,
) -> None:
    """Show the commands response followed, newest first."""
    from immune.cli import _print_rows, _store

    store = _store()
    try:
        rows = store.response_commands(agent_id=agent, state=state, limit=limit)
    finally:
        store.close()
    for row in rows:
        row["ts"] = row["created"]
    columns = ["ts", "agent_id", "action", "args", "state", "attempts", "origin"]
    _print_rows(rows, columns + ["error"], as_json)


@response_app.command("check")
def check(
    paths: Annotated[list[Path], typer.Argument(help="Playbook files or folders.")],
) -> None:
    """Check playbook files; exit 1 if any is refused."""
    from immune.cli import console, err_console

    bad = 0
    for path in paths:
        for file in playbook_files(path):
            try:
                books = load_file(file)
            except PlaybookError as exc:
                bad += 1
                err_console.print(f"[bold red]refused:[/] {exc}", markup=True)
                continue
            console.print(f"{file}: {len(books)} playbooks", markup=False)
    if bad:
        raise typer.Exit(1)
