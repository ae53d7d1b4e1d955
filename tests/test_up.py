"""The main job, `immune up`, as a user runs it; and the embedded brokers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiomqtt
import orjson
import pytest

from immune import broker
from immune.mqtt import parse_url

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root for the netlink process connector"
)


def immune(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "immune", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def poll_json(args: list[str], cwd: Path, env: dict[str, str], want, timeout=15.0):
    """Run an `immune` query until want(rows) holds; return the rows."""
    deadline = time.monotonic() + timeout
    rows: list[dict] = []
    while time.monotonic() < deadline:
        result = immune(*args, "--json", cwd=cwd, env=env)
        if result.returncode == 0:
            rows = [orjson.loads(line) for line in result.stdout.splitlines()]
            if want(rows):
                return rows
        time.sleep(0.2)
    raise AssertionError(f"`immune {' '.join(args)}` never matched; last: {rows}")


@pytest.fixture
def up_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMMUNE_")}
    env.update(
        IMMUNE_MQTT__TOPIC_PREFIX=f"immune-test/{uuid.uuid4().hex}",
        IMMUNE_MQTT__PERSISTENT_SESSION="false",
        IMMUNE_MQTT__CLIENT_ID=f"immune-up-test-{uuid.uuid4().hex[:8]}",
        IMMUNE_AGENT__ID=f"up-test-{uuid.uuid4().hex[:8]}",
        IMMUNE_AGENT__BATCH_MAX_DELAY="0.05",
    )
    return env


def start_up(
    cwd: Path, env: dict[str, str], command: str = "up", ready: str = "IMMUNE is up"
) -> subprocess.Popen[str]:
    # Output goes to a file: a pipe nobody reads would fill and block it.
    log = cwd / f"{command}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "immune", command],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if ready in log.read_text():
            return proc
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise AssertionError(f"immune {command} did not start:\n{log.read_text()}")


def stop_up(proc: subprocess.Popen[str], cwd: Path, command: str = "up") -> str:
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    out = (cwd / f"{command}.log").read_text()
    assert proc.returncode == 0, out
    return out


@needs_root
@pytest.mark.mqtt
@pytest.mark.root
def test_up_reports_a_temp_dir_exec_and_su(tmp_path: Path, up_env, mqtt_broker) -> None:
    up_env["IMMUNE_MQTT__URL"] = mqtt_broker
    proc = start_up(tmp_path, up_env)
    try:
        # Wait until the agent's own start is stored: the pipeline is live.
        poll_json(["events", "--kind", "agent_start"], tmp_path, up_env, bool)
        planted = tmp_path / "x"  # tmp_path lies under /tmp/
        shutil.copy("/bin/true", planted)
        subprocess.run([str(planted)], check=True)
        if shutil.which("su"):
            subprocess.run(["su", "nobody", "-s", "/bin/sh", "-c", "true"], check=True)

        alerts = poll_json(
            ["alerts", "--severity", "high", "--limit", "500"],
            tmp_path,
            up_env,
            lambda rows: any(r["data"].get("exe") == str(planted) for r in rows),
        )
        execs = poll_json(
            ["events", "--kind", "exec", "--exe", str(planted)],
            tmp_path,
            up_env,
            lambda rows: any(r.get("exe") == str(planted) for r in rows),
        )
        if shutil.which("su"):
            su = os.path.realpath(shutil.which("su") or "su")
            setuids = poll_json(
                ["events", "--kind", "setuid", "--exe", su, "--limit", "500"],
                tmp_path,
                up_env,
                lambda rows: any(r.get("euid") == 65534 for r in rows),
            )
            assert any(r.get("old_euid") == 0 for r in setuids)
    finally:
        out = stop_up(proc, tmp_path)
    # One run, one alert: read again now that the hive has stopped, so that
    # a second alert raised a moment after the first would be seen.
    alerts = poll_json(
        ["alerts", "--severity", "high", "--limit", "500"], tmp_path, up_env, bool
    )
    hits = [r for r in alerts if r["data"].get("exe") == str(planted)]
    assert [(r["rule"], r["severity"], r["count"]) for r in hits] == [
        ("exec-from-temp-dir", "high", 1)
    ]
    assert hits[0]["title"] == "Program executed from a temporary directory"
    assert any(r.get("argv") == [str(planted)] for r in execs)
    assert "Program executed from a temporary directory" in out  # printed live
    log = (tmp_path / "immune-alerts.log").read_text()
    assert str(planted) in log


@needs_root
@pytest.mark.mqtt
@pytest.mark.root
def test_up_hive_and_agent_as_separate_processes(
    tmp_path: Path, up_env, mqtt_broker
) -> None:
    up_env["IMMUNE_MQTT__URL"] = mqtt_broker
    hive = start_up(tmp_path, up_env, "hive", ready="listening under")
    try:
        agent = start_up(tmp_path, up_env, "agent", ready="connected to")
        try:
            planted = tmp_path / "planted"
            shutil.copy("/bin/true", planted)
            subprocess.run([str(planted), "--separately"], check=True)
            execs = poll_json(
                ["events", "--kind", "exec", "--exe", str(planted)],
                tmp_path,
                up_env,
                lambda rows: any(r.get("exe") == str(planted) for r in rows),
            )
            poll_json(
                ["alerts", "--severity", "high", "--limit", "500"],
                tmp_path,
                up_env,
                lambda rows: any(r["data"].get("exe") == str(planted) for r in rows),
            )
        finally:
            stop_up(agent, tmp_path, "agent")
    finally:
        stop_up(hive, tmp_path, "hive")
    hit = next(r for r in execs if r.get("exe") == str(planted))
    assert hit["argv"] == [str(planted), "--separately"]
    assert hit["agent_id"] == up_env["IMMUNE_AGENT__ID"]
    assert hit["sensor"] in ("ebpf", "cn_proc")


@needs_root
@pytest.mark.root
@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="needs mosquitto")
def test_up_starts_mosquitto_when_no_broker_answers(tmp_path: Path, up_env) -> None:
    closed = broker.free_port()  # nothing listens there
    up_env["IMMUNE_MQTT__URL"] = f"mqtt://127.0.0.1:{closed}"
    proc = start_up(tmp_path, up_env)
    try:
        rows = poll_json(["events", "--kind", "agent_start"], tmp_path, up_env, bool)
    finally:
        out = stop_up(proc, tmp_path)
    assert rows[0]["agent_id"] == up_env["IMMUNE_AGENT__ID"]
    assert "Started Mosquitto" in out


async def test_up_amqtt_fallback_broker_relays_messages() -> None:
    async with broker.amqtt_broker() as url:
        address = parse_url(url)
        async with aiomqtt.Client(address.host, address.port) as client:
            await client.subscribe("immune-test/#", qos=1)
            await client.publish("immune-test/x", b"hello", qos=1)
            async for message in client.messages:
                assert message.payload == b"hello"
                break
