"""Sigma rules on a live host: real processes, the agent, a broker, the hive.

`immune up` runs as a user runs it, with a rule directory of this test's
own; the test starts real processes and reads the alerts back with
`immune alerts`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import pytest

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root for the netlink process connector"
)

RULE = """\
title: IMMUNE live test - probe run by a shell
id: {rule_id}
status: test
description: The test's probe program, started by a shell, with its token.
tags:
    - attack.t1059.004
logsource:
    product: linux
    category: process_creation
detection:
    selection:
        Image|endswith: '/{probe}'
        CommandLine|contains: '{token}'
        ParentImage|endswith:
            - '/sh'
            - '/dash'
            - '/bash'
    condition: selection
level: high
"""


def immune(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "immune", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def wait_for_alert(cwd: Path, env: dict[str, str], rule_id: str) -> dict:
    deadline = time.monotonic() + 20
    rows: list[dict] = []
    while time.monotonic() < deadline:
        result = immune("alerts", "--json", cwd=cwd, env=env)
        if result.returncode == 0:
            rows = [orjson.loads(line) for line in result.stdout.splitlines()]
            for row in rows:
                if row["rule"] == rule_id:
                    return row
        time.sleep(0.3)
    raise AssertionError(f"no alert of {rule_id}; alerts: {rows}")


@needs_root
@pytest.mark.mqtt
@pytest.mark.root
def test_sigma_rule_fires_on_a_real_process_and_its_parent(
    tmp_path: Path, mqtt_broker: str
) -> None:
    token = f"sigma-probe-{uuid.uuid4().hex[:8]}"
    probe = f"immune-probe-{uuid.uuid4().hex[:6]}"
    rule_id = str(uuid.uuid4())
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "probe.yml").write_text(
        RULE.format(rule_id=rule_id, probe=probe, token=token)
    )
    planted = tmp_path / probe
    shutil.copy("/bin/sleep", planted)

    env = {k: v for k, v in os.environ.items() if not k.startswith("IMMUNE_")}
    env.update(
        IMMUNE_MQTT__URL=mqtt_broker,
        IMMUNE_MQTT__TOPIC_PREFIX=f"immune-test/{uuid.uuid4().hex}",
        IMMUNE_MQTT__PERSISTENT_SESSION="false",
        IMMUNE_MQTT__CLIENT_ID=f"immune-sigma-live-{uuid.uuid4().hex[:8]}",
        IMMUNE_AGENT__ID=f"sigma-live-{uuid.uuid4().hex[:8]}",
        IMMUNE_AGENT__BATCH_MAX_DELAY="0.05",
        IMMUNE_PLUGINS__SIGMA__RULE_DIRS=orjson.dumps([str(rules)]).decode(),
    )
    log = tmp_path / "up.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "immune", "up"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        deadline = time.monotonic() + 30
        while "IMMUNE is up" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        time.sleep(1.0)  # let the agent's sensor settle
        # The same program, run directly and then by a shell: only the second
        # has a shell for a parent. "; true" keeps the shell from exec'ing it.
        subprocess.run([str(planted), "0.3", token], check=False)
        subprocess.run(["/bin/sh", "-c", f"{planted} 0.3 {token}; true"], check=True)
        alert = wait_for_alert(tmp_path, env, rule_id)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert alert["plugin"] == "sigma"
    assert alert["severity"] == "high"
    assert alert["techniques"] == ["T1059.004"]
    assert alert["data"]["exe"] == str(planted)
    assert token in alert["data"]["cmdline"]
    alerts = [
        orjson.loads(line)
        for line in immune(
            "alerts", "--json", cwd=tmp_path, env=env
        ).stdout.splitlines()
    ]
    assert sum(1 for a in alerts if a["rule"] == rule_id) == 1  # not the direct run
    assert "Loaded 1 Sigma rules" in log.read_text()
