"""The agent with its kernel sensors and local policy, over a real broker.

The policy blocks execs only in a directory this test made, so nothing else
on the machine is refused.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_agent import clear_retained, config_for, inbox

from immune.agent import Agent, policy

pytestmark = [
    pytest.mark.mqtt,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="eBPF and fanotify need root"),
]


async def run_exec(path: Path) -> int | str:
    def run() -> int | str:
        try:
            return subprocess.run(
                [str(path), "immune-agent-test"], check=False
            ).returncode
        except PermissionError as exc:
            return os.strerror(exc.errno or 0)

    return await asyncio.to_thread(run)


async def test_agent_blocks_reports_and_takes_a_new_policy(
    tmp_path: Path, mqtt_broker: str, mqtt_prefix: str
) -> None:
    exec_dir = tmp_path / "drop"
    exec_dir.mkdir()
    shutil.copy2("/bin/true", exec_dir / "true")
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(
        f'[exec]\nmode = "block"\npaths = ["{exec_dir}/"]\n\n[files]\npaths = []\n'
    )
    config = config_for(
        mqtt_broker, mqtt_prefix, sensors=["ebpf", "fanotify"], policy=str(policy_file)
    )
    agent = Agent(config)
    stop = asyncio.Event()
    async with inbox(mqtt_broker, f"{mqtt_prefix}/#") as box:
        running = asyncio.create_task(agent.run(stop))
        try:
            await asyncio.wait_for(agent.connected.wait(), 30)
            assert await run_exec(exec_dir / "true") == "Operation not permitted"
            blocked = await box.wait_for(box.event(kind="exec", outcome="blocked"))

            # The hive's `policy` command: audit from now on.
            result = policy.apply_policy(
                {"exec": {"mode": "audit", "paths": [str(exec_dir)]}}
            )
            assert result == {"applied": True, "saved": str(policy_file)}
            assert await run_exec(exec_dir / "true") == 0
            audited = await box.wait_for(
                box.event(kind="exec", sensor="ebpf", exe=str(exec_dir / "true"))
            )
            beat = await box.wait_for(
                lambda: next(
                    (
                        p
                        for leaf, _, p in box.messages
                        if leaf == "heartbeat"
                        and p["counters"].get("agent.sensor.fanotify.blocked")
                    ),
                    None,
                )
            )
        finally:
            stop.set()
            await asyncio.wait_for(running, 30)
            policy.install(policy.PolicyStore())  # the agent installed its own
    assert blocked["sensor"] == "fanotify"
    assert blocked["exe"] == str(exec_dir / "true")
    assert blocked["extra"]["rule"] == "exec_path"
    assert audited["extra"] == {"rule": "exec_path", "mode": "audit"}
    assert audited["argv"] == [str(exec_dir / "true"), "immune-agent-test"]
    counters = beat["counters"]
    assert counters["agent.sensor.fanotify.blocked"] == 1
    assert counters["agent.sensor.ebpf.seen"] >= 1
    assert counters["agent.blocked"] == 1
    _, registration = box.first("register")()  # type: ignore[misc]
    assert registration["sensors"] == ["ebpf", "fanotify"]
    assert 'mode = "audit"' in policy_file.read_text()
    await clear_retained(mqtt_broker, agent.topic("status"))
