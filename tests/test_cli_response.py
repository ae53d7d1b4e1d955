"""immune response: runs and commands listed from storage; playbook checks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from clirun import run_immune as run
from immune.events import new_id, now_ns
from immune.storage import Store


async def _seed(url: str) -> str:
    store = Store(url)
    store.upgrade()
    run_id, now = new_id(), now_ns()
    async with store:
        await store.add_run(
            id=run_id,
            playbook="critical-isolate",
            alert_id="a1",
            rule="exploit-x",
            agents=["web-1"],
            dry_run=False,
            state="done",
            started=now,
            finished=now,
            steps=[{"action": "isolate", "state": "done"}],
        )
        await store.add_response_command(
            id=new_id(),
            run_id=run_id,
            alert_id="a1",
            origin="playbook",
            agent_id="web-1",
            action="isolate",
            args={"duration_s": 3600},
            state="succeeded",
            attempts=1,
            first_id="c1",
            created=now,
            updated=now,
        )
    return run_id


def test_cli_response_lists_runs_and_commands(tmp_path: Path) -> None:
    run_id = asyncio.run(_seed(f"sqlite:///{tmp_path / 'immune.db'}"))

    done = run("response", "runs", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (row,) = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert row["id"] == run_id and row["playbook"] == "critical-isolate"
    assert [c["action"] for c in row["commands"]] == ["isolate"]

    table = run("response", "runs", cwd=tmp_path)
    assert "critical-isolate" in table.stdout
    assert "isolate@web-1:succeeded" in table.stdout

    cmds = run("response", "commands", "--state", "succeeded", cwd=tmp_path)
    assert cmds.returncode == 0 and "isolate" in cmds.stdout


def test_cli_response_check_names_the_bad_file_and_line(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        "playbooks:\n  - id: a\n    actions: [{action: alert}]\n", encoding="utf-8"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "playbooks:\n  - id: b\n    actions:\n      - action: nuke\n", encoding="utf-8"
    )
    ok = run("response", "check", str(good), cwd=tmp_path)
    assert ok.returncode == 0 and "1 playbooks" in ok.stdout
    refused = run("response", "check", str(tmp_path), cwd=tmp_path)
    assert refused.returncode == 1
    assert f"{bad}:4: unknown action 'nuke'" in refused.stderr.replace("\n", "")
