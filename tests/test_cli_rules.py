"""immune rules check / test, as a rule author runs them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from clirun import run_immune as run
from immune.events import Event, encode, new_id, now_ns
from immune.storage import Store

CHAIN = [
    {"kind": "exec", "exe": "/tmp/x", "argv": ["/tmp/x"]},
    {"kind": "connect", "addr": "203.0.113.5", "port": 4444},
    {"kind": "setuid", "euid": 0, "old_euid": 1000, "exe": "/tmp/x"},
]

MINE = """\
rules:
  - id: my-tool
    severity: low
    condition: {kind: exec, exe_name: nmap}
    tests:
      - event: {kind: exec, exe: /usr/bin/nmap}
        expect: true
      - event: {kind: exec, exe: /usr/bin/nmap-helper}
        expect: BROKEN
"""


def chain_events(start: int) -> list[Event]:
    return [
        Event(id=f"c{n}", agent_id="web-1", host="web-1", ts=start + n * 10**9, **f)
        for n, f in enumerate(CHAIN)
    ]


def write_jsonl(path: Path, events: list[Event]) -> Path:
    path.write_bytes(b"".join(encode(e) + b"\n" for e in events))
    return path


def test_cli_rules_check_accepts_good_files(tmp_path):
    (tmp_path / "mine.yaml").write_text(MINE.replace("BROKEN", "false"))
    result = run("rules", "check", "mine.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ok: mine.yaml: 1 rules, 0 correlations" in result.stdout


def test_cli_rules_check_refuses_with_file_line_and_reason(tmp_path):
    (tmp_path / "good.yaml").write_text(MINE.replace("BROKEN", "false"))
    (tmp_path / "bad.yaml").write_text(
        "rules:\n  - id: x\n    condition:\n      port: {startswith: '44'}\n"
    )
    result = run("rules", "check", "good.yaml", "bad.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert "refused: bad.yaml:4: port is a number" in result.stderr
    assert "ok: good.yaml" in result.stdout


def test_cli_rules_check_without_files_checks_the_defaults(tmp_path):
    result = run("rules", "check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "10-host.yaml: 7 rules" in result.stdout


def test_cli_rules_test_runs_inline_tests_and_fails_on_a_mismatch(tmp_path):
    (tmp_path / "mine.yaml").write_text(MINE.replace("BROKEN", "false"))
    passing = run("rules", "test", "mine.yaml", cwd=tmp_path)
    assert passing.returncode == 0, passing.stderr
    assert "2 of 2 rule tests passed." in passing.stdout

    (tmp_path / "mine.yaml").write_text(MINE.replace("BROKEN", "true"))
    failing = run("rules", "test", "mine.yaml", cwd=tmp_path)
    assert failing.returncode == 1
    assert "FAIL mine.yaml:8 my-tool: expected True, got False" in failing.stderr


def test_cli_rules_test_replays_events_against_expectations(tmp_path):
    write_jsonl(tmp_path / "ev.jsonl", chain_events(now_ns()))
    (tmp_path / "ok.yaml").write_text(
        "expect:\n  chain-reverse-shell: 1\n  setuid-to-root: 1\n"
    )
    (tmp_path / "wrong.yaml").write_text(
        "exact: true\nexpect:\n  chain-reverse-shell: 2\n"
    )
    ok = run(
        "rules", "test", "--events", "ev.jsonl", "--expect", "ok.yaml", cwd=tmp_path
    )
    assert ok.returncode == 0, ok.stderr
    assert "chain-reverse-shell" in ok.stdout and "4 alerts." in ok.stdout

    wrong = run(
        "rules", "test", "-e", "ev.jsonl", "--expect", "wrong.yaml", cwd=tmp_path
    )
    assert wrong.returncode == 1
    assert "chain-reverse-shell: expected 2 alerts, got 1" in wrong.stderr
    assert "exec-from-temp-dir: expected no alerts, got 1" in wrong.stderr


def test_cli_rules_test_json_lists_the_alerts(tmp_path):
    write_jsonl(tmp_path / "ev.jsonl", chain_events(now_ns()))
    result = run("rules", "test", "-e", "ev.jsonl", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    alerts = [
        orjson.loads(line)
        for line in result.stdout.splitlines()
        if line.startswith("{")
    ]
    chain = [a for a in alerts if a["rule"] == "chain-reverse-shell"]
    assert len(chain) == 1 and chain[0]["event_ids"] == ["c0", "c1", "c2"]


def test_cli_rules_test_names_the_bad_line_of_an_events_file(tmp_path):
    good = encode(chain_events(now_ns())[0]).decode()
    (tmp_path / "ev.jsonl").write_text(f'{good}\n{{"id": "x", "kind": "exec"}}\n')
    result = run("rules", "test", "-e", "ev.jsonl", cwd=tmp_path)
    assert result.returncode == 1
    assert "ev.jsonl:2: Object missing required field `agent_id`" in result.stderr


def test_cli_rules_test_expect_without_events_is_an_error(tmp_path):
    (tmp_path / "x.yaml").write_text("expect: {a: 1}\n")
    result = run("rules", "test", "--expect", "x.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert "--expect needs events" in result.stderr


def test_cli_rules_test_replays_a_recorded_session(tmp_path):
    events = chain_events(now_ns() - 60 * 10**9)
    events.append(
        Event(
            id=new_id(),
            agent_id="db-1",
            host="db-1",
            ts=now_ns(),
            kind="exec",
            exe="/bin/ls",
        )
    )

    async def record() -> None:
        store = Store(f"sqlite:///{tmp_path / 'immune.db'}")
        store.upgrade()
        async with store:
            await store.add_events(events)

    asyncio.run(record())
    (tmp_path / "want.yaml").write_text("expect:\n  chain-reverse-shell: 1\n")
    result = run(
        "rules",
        "test",
        "--recorded",
        "--since",
        "1h",
        "--expect",
        "want.yaml",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "chain-reverse-shell" in result.stdout
