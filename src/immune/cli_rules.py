"""``immune rules``: check rule files and test them on events.

``immune rules check FILE...`` validates files; ``immune rules test FILE...``
runs the files' own ``tests:`` and, given ``--events`` or ``--recorded``,
replays events through the rules and correlations and shows what fires. With
``--expect`` (or a failing inline test) it exits 1 on a mismatch, for CI.
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

from immune.events import Event, parse_event, to_dict
from immune.rules import DEFAULT_DIR, RuleSet, load_rules, rule_files
from immune.rules.errors import RuleError
from immune.rules.testing import (
    Replay,
    TestResult,
    load_expectations,
    read_events,
    run_rule_tests,
)
from immune.safe import printable

app = typer.Typer(
    help="Check rule files and test them on events.", no_args_is_help=True
)
console = Console()
err_console = Console(stderr=True)

Files = Annotated[
    list[Path] | None,
    typer.Argument(help="Rule files or directories of them (*.yaml, *.yml)."),
]
NoDefaults = Annotated[
    bool,
    typer.Option("--no-defaults", help="Leave out the shipped default rules."),
]


def _load(files: list[Path], defaults: bool) -> RuleSet:
    """All files, each refused one reported; exit 1 if any was refused."""
    ruleset = load_rules(files, strict=False, defaults=defaults)
    for error in ruleset.errors:
        err_console.print(f"[bold red]refused:[/] {escape(str(error))}")
    return ruleset


@app.command("check")
def check(files: Files = None, no_defaults: NoDefaults = False) -> None:
    """Validate rule files: each is accepted, or refused with file, line and reason."""
    files = files or []
    ruleset = _load(files, not no_defaults)
    shown = [p for p in files if p.exists()] or ([] if no_defaults else [DEFAULT_DIR])
    for path in rule_files(shown):
        if str(path) in ruleset.texts:
            rules = sum(1 for r in ruleset.rules.values() if r.file == str(path))
            corrs = sum(1 for c in ruleset.correlations.values() if c.file == str(path))
            console.print(
                f"ok: {escape(str(path))}: {rules} rules, {corrs} correlations"
            )
    if ruleset.errors:
        raise typer.Exit(1)


@app.command("test")
def test(
    files: Files = None,
    events: Annotated[
        list[Path] | None,
        typer.Option("--events", "-e", help="JSON-lines file of events (or batches)."),
    ] = None,
    recorded: Annotated[
        bool,
        typer.Option(
            "--recorded", help="Replay the events stored in the hive's database."
        ),
    ] = False,
    since: Annotated[
        str | None,
        typer.Option(help="With --recorded: from this long ago (10m, 2h, ISO)."),
    ] = None,
    agent: Annotated[
        str | None, typer.Option(help="With --recorded: one agent only.")
    ] = None,
    expect: Annotated[
        Path | None,
        typer.Option(
            help="YAML file: expect: {rule-id: count}, and exact: true|false."
        ),
    ] = None,
    show: Annotated[bool, typer.Option("--show", help="Print every alert.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Alerts as JSON lines.")
    ] = False,
    no_defaults: NoDefaults = False,
) -> None:
    """Run the rules' own tests, and replay events through rules and correlations."""
    files = files or []
    ruleset = _load(files, not no_defaults)
    failed = bool(ruleset.errors)
    tested = [str(p) for p in rule_files([p for p in files if p.exists()])]
    results = run_rule_tests(ruleset, tested if files else None)
    failed |= _report_tests(results)

    stream = _events(events or [], recorded, since, agent)
    if stream is not None:
        replay = Replay(ruleset)
        replay.run(stream)
        _report_replay(replay, show, as_json)
        if expect is not None:
            problems = load_expectations(expect).check(replay.counts())
            for problem in problems:
                err_console.print(f"[bold red]mismatch:[/] {escape(problem)}")
            failed |= bool(problems)
    elif expect is not None:
        raise RuleError("--expect needs events to replay: --events FILE or --recorded")
    if failed:
        raise typer.Exit(1)


def _report_tests(results: list[TestResult]) -> bool:
    bad = [r for r in results if not r.ok]
    for result in bad:
        why = result.error or f"expected {result.expected!r}, got {result.got!r}"
        err_console.print(
            f"[bold red]FAIL[/] {escape(result.where)} {escape(result.target)}: "
            f"{escape(why)}"
        )
    if results:
        console.print(f"{len(results) - len(bad)} of {len(results)} rule tests passed.")
    return bool(bad)


def _events(
    paths: list[Path], recorded: bool, since: str | None, agent: str | None
) -> list[Event] | None:
    if not paths and not recorded:
        return None
    stream: list[Event] = []
    for path in paths:
        stream += read_events(path)
    if recorded:
        stream += _recorded(since, agent)
    return stream


def _recorded(since: str | None, agent: str | None) -> list[Event]:
    # The main CLI knows how to open the configured database.
    from immune.cli import _store, parse_since

    store = _store()
    try:
        rows = store.events(agent_id=agent, since_ns=parse_since(since), limit=None)
    finally:
        store.close()
    return sorted((parse_event(row) for row in rows), key=lambda e: e.ts)


def _report_replay(replay: Replay, show: bool, as_json: bool) -> None:
    if as_json:
        for alert in replay.alerts:
            sys.stdout.write(orjson.dumps(to_dict(alert)).decode() + "\n")
        return
    if show:
        for alert in replay.alerts:
            console.print(
                _alert_line(alert.rule, alert.severity, alert.host, alert.data)
            )
    table = Table(header_style="bold")
    for column in ("rule", "plugin", "severity", "alerts"):
        table.add_column(column)
    first: dict[str, Any] = {}
    for alert in replay.alerts:
        first.setdefault(alert.rule, alert)
    for rule, count in sorted(replay.counts().items()):
        table.add_row(
            escape(rule), first[rule].plugin, first[rule].severity, str(count)
        )
    console.print(table)
    console.print(f"{len(replay.alerts)} alerts.")


def _alert_line(
    rule: str, severity: str, host: str | None, data: dict[str, Any]
) -> str:
    details = " ".join(f"{k}={v}" for k, v in data.items() if k != "rule_file")
    return escape(printable(f"[{severity}] {rule} host={host} {details}", 1024))
