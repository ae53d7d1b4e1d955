"""``immune sigma``: what IMMUNE makes of Sigma rule files.

``immune sigma check DIR...`` loads rules as the ``sigma`` plugin would and
lists those that load (with the event kinds they apply to) and those that
are refused, one by one, with the reason.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from immune.safe import printable

app = typer.Typer(
    help="Check Sigma rules against IMMUNE's events.", no_args_is_help=True
)
console = Console()


@app.command()
def check(
    paths: Annotated[
        list[Path], typer.Argument(help="Sigma rule files or directories.")
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per rule.")
    ] = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit 1 if any rule is refused.")
    ] = False,
    refused_only: Annotated[
        bool, typer.Option("--refused", help="List the refused rules only.")
    ] = False,
) -> None:
    """Load Sigma rules; print those loaded and those refused, with the reason."""
    from immune.sigma import load_rules

    ruleset = load_rules(paths)
    loaded: list[dict[str, Any]] = [
        {
            "status": "loaded",
            "id": rule.id,
            "title": rule.title,
            "level": rule.severity,
            "kinds": list(rule.kinds),
            "file": rule.file,
            "notes": rule.notes,
        }
        for rule in ruleset.rules
    ]
    loaded += [
        {
            "status": "loaded",
            "id": rule.id,
            "title": rule.title,
            "level": rule.severity,
            "kinds": [f"correlation:{rule.type}"],
            "file": rule.file,
            "notes": [],
        }
        for rule in ruleset.correlations
    ]
    refused: list[dict[str, Any]] = [
        {
            "status": "refused",
            "id": r.rule_id,
            "title": r.title,
            "file": r.file,
            "reason": r.reason,
        }
        for r in ruleset.refused
    ]
    rows = refused if refused_only else loaded + refused
    if as_json:
        for row in rows:
            sys.stdout.write(orjson.dumps(row).decode() + "\n")
    else:
        _print_table(rows)
    summary = (
        f"{len(ruleset.rules)} rules and {len(ruleset.correlations)} correlations "
        f"loaded, {len(refused)} refused, from {ruleset.files} files."
    )
    Console(stderr=True).print(summary)
    if strict and refused:
        raise typer.Exit(1)


def _print_table(rows: list[dict[str, Any]]) -> None:
    table = Table(header_style="bold")
    for column in ("status", "id", "title", "kinds / reason", "file"):
        table.add_column(column, overflow="fold")
    for row in rows:
        detail = row.get("reason") or " ".join(row["kinds"])
        if row.get("notes"):
            detail += " (" + "; ".join(row["notes"]) + ")"
        cells = [row["status"], row["id"] or "-", row["title"] or "-", detail]
        cells.append(row["file"])
        table.add_row(*(escape(printable(cell, 300)) for cell in cells))
    console.print(table)
