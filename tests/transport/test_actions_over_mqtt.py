"""Response actions end to end: the hive's bus, Mosquitto, a real agent, back.

A hive (network plugin) and an agent (``immune.agent.Agent``, in this
process) talk through a real Mosquitto; the agent has the hive's command
public key. The test publishes ``command.send`` on the hive's bus, as a
detection or the response plugin would, and checks the effect on the host
(a process it started, a file it wrote), the command's row in the
``commands`` table and the ``command.state`` messages on the bus. The agent
acts in a cgroup prefix, a state directory and (for nftables) a network
namespace of the test's own, never on the machine's own.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from immune import signing
from immune.agent import policy
from immune.agent.commands import CommandRunner
from immune.commands import make_command
from immune.config import Config
from immune.events import encode, new_id, now_ns
from immune.hive import Hive
from immune.metrics import Metrics

from .conftest import RunningAgent, agent_config, hive_config, until

pytestmark = pytest.mark.mqtt

SECOND = 10**9


def need(condition: bool, reason: str) -> None:
    """Skip (fail in CI) unless ``condition``."""
    if condition:
        return
    if os.environ.get("IMMUNE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (IMMUNE_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


@dataclass
class Pair:
    """A hive and an agent on one broker, and the bus's ``command.state``."""

    hive: Hive
    running: RunningAgent
    states: list[dict[str, Any]] = field(default_factory=list)

    @property
    def agent_id(self) -> str:
        return self.running.agent.agent_id

    async def command(
        self, action: str, args: Any, timeout: float = 20.0, hive_words: bool = False
    ) -> dict[str, Any]:
        """Publish ``command.send``; the row once it has its final state.

        With ``hive_words`` the message is made as the playbooks and the
        response plugin make theirs (:func:`immune.commands.make_command`).
        """
        if hive_words:
            message = make_command(self.agent_id, action, args, origin="playbook")
        else:
            message = {
                "id": new_id(),
                "agent_id": self.agent_id,
                "action": action,
                "args": args,
                "expires_ns": now_ns() + 30 * SECOND,
                "origin": "test",
                "alert_id": None,
            }
        command_id = message["id"]
        await self.hive.publish("command.send", message)

        def final() -> bool:
            row = self.hive.store.command(command_id)
            return bool(row) and row["state"] in signing.FINAL_STATES

        await until(final, timeout)
        # command.state follows the table: wait for the final one on the bus.
        await until(lambda: self.seen(command_id)[-1:] == [self.row(command_id)])
        return self.hive.store.command(command_id)

    def row(self, command_id: str) -> str:
        return str(self.hive.store.command(command_id)["state"])

    def seen(self, command_id: str) -> list[str]:
        return [s["state"] for s in self.states if s["id"] == command_id]

    def state_message(self, command_id: str) -> dict[str, Any]:
        return [s for s in self.states if s["id"] == command_id][-1]


@pytest.fixture
def cgroup_prefix() -> Iterator[str]:
    """A cgroup prefix of the test's own, removed after it."""
    prefix = f"immune-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    try:
        from immune.agent.actions.cgroups import cgroup2_root

        base = cgroup2_root() / prefix
    except Exception:  # noqa: BLE001 - no cgroup v2: nothing was made
        return
    if base.is_dir():
        for child in base.iterdir():
            if child.is_dir():
                child.rmdir()
        base.rmdir()


@pytest.fixture
async def pair_factory(
    tmp_path: Path,
    mqtt_broker: str,
    mqtt_prefix: str,
    cgroup_prefix: str,
    hive_factory: Any,
    agent_factory: Any,
) -> AsyncIterator[Any]:
    """``await pair_factory(**agent_settings)``: a hive and its agent."""

    async def start(plugins: dict[str, Any] | None = None, **agent: Any) -> Pair:
        config = hive_config(
            tmp_path, f"sqlite:///{tmp_path / 'hive.db'}", mqtt_broker, mqtt_prefix
        )
        config.plugins.update(plugins or {})
        hive = await hive_factory(config)
        pair = Pair(hive, None)  # type: ignore[arg-type]
        hive.bus.subscribe("command.state", pair.states.append, owner="test")
        key = signing.load_or_create_key(config.hive.command_key)
        (tmp_path / "hive.pub").write_bytes(signing.public_pem(key))
        agent.setdefault("cgroup_prefix", cgroup_prefix)
        agent.setdefault("actions_dir", str(tmp_path / "actions"))
        agent.setdefault("policy", str(tmp_path / "policy.toml"))
        pair.running = await agent_factory(
            agent_config(
                tmp_path,
                mqtt_broker,
                mqtt_prefix,
                command_public_key=str(tmp_path / "hive.pub"),
                **agent,
            )
        )
        return pair

    yield start


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


async def test_kill_a_process_acknowledged_with_its_result(
    pair_factory: Any, sleeper: subprocess.Popen[bytes]
) -> None:
    pair = await pair_factory()
    row = await pair.command("kill", {"pid": sleeper.pid})

    assert row["state"] == "succeeded", row["error"]
    assert row["result"]["killed"] == [sleeper.pid]
    assert row["result"]["signal"] == "KILL"
    assert sleeper.wait(5) == -9  # gone, by SIGKILL
    assert pair.seen(row["id"]) == ["sent", "acknowledged", "succeeded"]
    message = pair.state_message(row["id"])
    assert message["agent_id"] == pair.agent_id and message["action"] == "kill"
    assert message["result"]["killed"] == [sleeper.pid]
    assert pair.running.agent.metrics.get("agent.actions_done") == 1


async def test_quarantine_then_restore_a_file_byte_for_byte(
    pair_factory: Any, tmp_path: Path
) -> None:
    pair = await pair_factory()
    victim = tmp_path / "dropper.bin"
    content = os.urandom(300_000) + b"\x7fELF tail"
    victim.write_bytes(content)
    victim.chmod(0o750)

    row = await pair.command("quarantine", {"path": str(victim)})
    assert row["state"] == "succeeded", row["error"]
    assert row["result"]["sha256"] == hashlib.sha256(content).hexdigest()
    assert row["result"]["size"] == len(content)
    assert not victim.exists()
    sealed = tmp_path / "actions" / "vault" / f"{row['result']['id']}.bin"
    assert sealed.exists() and content[:64] not in sealed.read_bytes()

    back = await pair.command("restore", {"id": row["result"]["id"]})
    assert back["state"] == "succeeded", back["error"]
    assert back["result"]["sha256"] == hashlib.sha256(content).hexdigest()
    assert victim.read_bytes() == content
    assert victim.stat().st_mode & 0o777 == 0o750
    assert pair.seen(back["id"]) == ["sent", "acknowledged", "succeeded"]

    # Nothing to restore any more, and a file that is not there: clear errors.
    again = await pair.command("restore", {"id": row["result"]["id"]})
    assert again["state"] == "failed"
    assert row["result"]["id"] in again["error"]
    missing = await pair.command("quarantine", {"path": str(tmp_path / "none")})
    assert missing["state"] == "failed" and "none" in missing["error"]


async def test_collect_evidence_of_a_process(pair_factory: Any) -> None:
    pair = await pair_factory()
    mark = uuid.uuid4().hex
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)", mark],
        env={**os.environ, "IMMUNE_TEST_MARK": mark},
    )
    try:
        await until(lambda: mark in Path(f"/proc/{proc.pid}/cmdline").read_text())
        row = await pair.command("collect", {"pid": proc.pid})
    finally:
        proc.kill()
        proc.wait()

    assert row["state"] == "succeeded", row["error"]
    evidence = row["result"]
    exe = os.path.realpath(sys.executable)
    assert evidence["pid"] == proc.pid and evidence["exe"] == exe
    assert evidence["exe_sha256"] == hashlib.sha256(Path(exe).read_bytes()).hexdigest()
    assert evidence["cmdline"][-1] == mark
    assert evidence["environ"]["IMMUNE_TEST_MARK"] == mark
    assert any(m["path"] == exe for m in evidence["maps"])
    assert pair.state_message(row["id"])["result"]["pid"] == proc.pid


async def test_collect_of_a_large_process_still_answers(pair_factory: Any) -> None:
    # Thousands of mappings (a JVM's or a browser's count): the evidence is
    # far over one message; the agent must still answer, not go silent.
    code = (
        "import mmap, time\n"
        "keep = []\n"
        "for i in range(3000):\n"
        "    keep.append(mmap.mmap(-1, 4096, prot=mmap.PROT_READ"
        " if i % 2 else mmap.PROT_READ | mmap.PROT_WRITE))\n"
        "print('ready', flush=True)\n"
        "time.sleep(300)\n"
    )
    pair = await pair_factory()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        row = await pair.command("collect", {"pid": proc.pid})
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
    assert row["state"] == "succeeded", row["error"]
    assert row["result"]["pid"] == proc.pid
    assert row["result"]["truncated"]["maps"] > 3000  # says what was cut to fit
    assert 0 < len(row["result"]["maps"]) < 3000
    assert pair.running.agent.metrics.get("agent.results_truncated") == 1


async def test_collect_of_a_process_with_undecodable_argv(pair_factory: Any) -> None:
    # A command line that is not UTF-8 (on purpose, say, to break tools).
    pair = await pair_factory()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)", b"x\xff\xfey"]
    )
    try:
        await until(lambda: b"\xff" in Path(f"/proc/{proc.pid}/cmdline").read_bytes())
        row = await pair.command("collect", {"pid": proc.pid})
    finally:
        proc.kill()
        proc.wait()
    assert row["state"] == "succeeded", row["error"]
    assert row["result"]["cmdline"][-1] == "x\\xff\\xfey"


async def test_policy_command_changes_the_agent_policy(
    pair_factory: Any, tmp_path: Path
) -> None:
    pair = await pair_factory()
    assert policy.current().rules.policy.exec.mode == "audit"

    row = await pair.command("policy", {"exec": {"mode": "block"}})
    assert row["state"] == "succeeded", row["error"]
    assert row["result"] == {"applied": True, "saved": str(tmp_path / "policy.toml")}
    rules = policy.current().rules
    assert rules.policy.exec.mode == "block"
    assert rules.exec_verdict("/tmp/x") is not None
    assert rules.exec_verdict("/tmp/x").block  # type: ignore[union-attr]
    saved = policy.load(tmp_path / "policy.toml")
    assert saved.policy.exec.mode == "block"
    assert saved.policy.ports.ports == policy.BLOCKED_PORTS  # the rest: defaults

    bad = await pair.command("policy", {"exec": {"mode": "deny"}})
    assert bad["state"] == "failed"
    assert "policy from the hive" in bad["error"] and "exec.mode" in bad["error"]
    regex = await pair.command("policy", {"cmdline": {"patterns": ["(unclosed"]}})
    assert regex["state"] == "failed" and "not RE2" in regex["error"]
    assert pair.seen(bad["id"]) == ["sent", "acknowledged", "failed"]
    assert pair.state_message(bad["id"])["error"] == bad["error"]
    # The rules in force did not move.
    assert policy.current().rules.policy.exec.mode == "block"
    assert policy.load(tmp_path / "policy.toml").policy.exec.mode == "block"
    assert pair.running.agent.metrics.get("agent.actions_failed") == 2


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def runs(pid: int) -> bool:
    before = cpu_ticks(pid)
    time.sleep(0.3)
    return cpu_ticks(pid) > before


def cgroup(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return next(line[3:].strip() for line in f if line.startswith("0::"))


async def test_freeze_then_thaw_a_process(
    pair_factory: Any, cgroup_prefix: str
) -> None:
    need(os.geteuid() == 0, "freeze needs root (it moves a process between cgroups)")
    pair = await pair_factory()
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        origin = cgroup(proc.pid)
        row = await pair.command("freeze", {"pid": proc.pid})
        assert row["state"] == "succeeded", row["error"]
        assert row["result"]["frozen"] == [proc.pid]
        assert cgroup(proc.pid) == f"/{cgroup_prefix}/freeze-{proc.pid}"
        assert not runs(proc.pid)

        row = await pair.command("thaw", {"pid": proc.pid})
        assert row["state"] == "succeeded", row["error"]
        assert row["result"]["thawed"] == [proc.pid]
        assert cgroup(proc.pid) == origin
        assert runs(proc.pid)
        assert pair.seen(row["id"]) == ["sent", "acknowledged", "succeeded"]
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    ("action", "args", "reason"),
    [
        ("kill", {"pid": 1}, "pid 1 refused: never act on init"),
        ("kill", {"pid": "1234"}, "Expected `int`, got `str` - at `$.pid`"),
        ("kill", {"pid": 2**40}, "kill: bad arguments"),
        ("kill", {"pid": 1234, "rm": "-rf /"}, "unknown field `rm`"),
        ("freeze", {}, "missing required field `pid`"),
        ("quarantine", {"path": 7}, "Expected `str`, got `int` - at `$.path`"),
        ("restore", {"id": "../../etc/shadow"}, "restore: bad arguments"),
        ("thaw", {"pid": os.getpid()}, "is not frozen by IMMUNE"),
    ],
)
async def test_bad_arguments_fail_with_the_reason_and_the_agent_stays_up(
    pair_factory: Any, action: str, args: dict[str, Any], reason: str
) -> None:
    pair = await pair_factory()
    row = await pair.command(action, args)
    assert row["state"] == "failed"
    assert reason in row["error"]
    assert pair.state_message(row["id"])["error"] == row["error"]
    assert not pair.running.task.done()
    ping = await pair.command("ping", {"echo": "still here"})
    assert ping["state"] == "succeeded" and ping["result"]["echo"] == "still here"


async def test_the_agent_itself_is_not_a_target(pair_factory: Any) -> None:
    pair = await pair_factory()
    row = await pair.command("kill", {"pid": os.getpid()})
    assert row["state"] == "failed" and "it is the agent itself" in row["error"]
    assert not pair.running.task.done()


async def test_unknown_action_is_refused_by_the_agent(pair_factory: Any) -> None:
    pair = await pair_factory()
    row = await pair.command("format_disk", {})
    assert row["state"] == "refused" and "unknown action" in row["error"]
    assert pair.seen(row["id"]) == ["sent", "refused"]


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace of the test's own, deleted after it."""
    need(os.geteuid() == 0, "network namespaces need root")
    need(
        shutil.which("ip") is not None and shutil.which("nft") is not None,
        "needs root, ip and nft (apt-get install iproute2 nftables)",
    )
    name = f"immune-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def nft_in(netns: str, *args: str) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.stdout + done.stderr


async def test_block_and_unblock_in_the_agent_netns(
    pair_factory: Any, netns: str
) -> None:
    # [agent] actions_netns points nftables into the test's namespace.
    host_tables = subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True, timeout=30
    ).stdout
    pair = await pair_factory(actions_netns=netns)
    row = await pair.command("block", {"port": 31337})
    assert row["state"] == "succeeded", row["error"]
    assert "31337" in nft_in(netns, "list", "set", "inet", "immune", "block_ports")

    row = await pair.command("unblock", {"port": 31337})
    assert row["state"] == "succeeded", row["error"]
    assert "31337" not in nft_in(netns, "list", "set", "inet", "immune", "block_ports")
    again = await pair.command("unblock", {"port": 31337})
    assert again["state"] == "failed" and "port 31337 is not blocked" in again["error"]
    after = subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True, timeout=30
    ).stdout
    assert after == host_tables  # the machine's own ruleset was not touched


# --- The acknowledgement's payload, without a broker -------------------------


def ack(result: Any, state: str = "succeeded") -> dict[str, Any]:
    return {"v": 1, "id": new_id(), "agent_id": "a1", "state": state,
            "result": result, "error": None, "ts": now_ns()}  # fmt: skip


def test_ack_over_the_message_limit_cuts_the_longest_lists() -> None:
    config = Config()
    config.agent.batch_max_bytes = 8192
    runner = CommandRunner(config, "a1", Metrics())
    result = {"pid": 7, "maps": [{"path": "/x" * 20}] * 500, "environ": {"A": "b"}}
    raw = runner.ack_payload(ack(result))
    assert len(raw) <= 8192
    sent = orjson.loads(raw)
    assert sent["state"] == "succeeded" and sent["result"]["pid"] == 7
    assert sent["result"]["truncated"] == {"maps": 500}
    assert sent["result"]["environ"] == {"A": "b"}
    assert runner.metrics.get("agent.results_truncated") == 1


def test_ack_that_cannot_fit_fails_with_the_reason() -> None:
    config = Config()
    config.agent.batch_max_bytes = 8192
    raw = CommandRunner(config, "a1", Metrics()).ack_payload(ack({"x": "y" * 9000}))
    sent = orjson.loads(raw)
    assert sent["state"] == "failed" and sent["result"] is None
    assert "exceeds [agent] batch_max_bytes (8192)" in sent["error"]


def test_ack_with_undecodable_text_is_sent_escaped() -> None:
    runner = CommandRunner(Config(), "a1", Metrics())
    text = b"x\xff".decode("utf-8", "surrogateescape")
    raw = runner.ack_payload(ack({"cmdline": [text], "environ": {text: "\ud800"}}))
    sent = orjson.loads(raw)
    assert sent["result"] == {"cmdline": ["x\\xff"], "environ": {"x\\xff": "\\ud800"}}


def test_ack_with_an_integer_beyond_64_bits_fails_with_the_reason() -> None:
    raw = CommandRunner(Config(), "a1", Metrics()).ack_payload(ack({"n": 2**70}))
    sent = orjson.loads(raw)
    assert sent["state"] == "failed" and "cannot be encoded" in sent["error"]
    assert encode(sent)  # what went out is itself valid JSON


def test_agent_refuses_a_cgroup_prefix_that_is_not_a_name(tmp_path: Path) -> None:
    from immune.agent import Agent
    from immune.errors import ConfigError

    config = agent_config(tmp_path, "mqtt://127.0.0.1:1883", "p", cgroup_prefix="../x")
    with pytest.raises(ConfigError, match=r"\[agent\] cgroup_prefix '../x' must be"):
        Agent(config)


def test_agent_actions_settings_come_from_its_config(tmp_path: Path) -> None:
    from immune.agent import Agent

    config = agent_config(
        tmp_path,
        "mqtt://broker.example:8883",
        "p",
        actions_dir=str(tmp_path / "act"),
        cgroup_prefix="immune-x",
        actions_netns="ns-1",
    )
    settings = Agent(config).action_settings
    assert settings.state_dir == tmp_path / "act"
    assert settings.cgroup_prefix == "immune-x" and settings.netns == "ns-1"
    assert settings.broker == ("broker.example", 8883)  # kept by isolate


# --- Commands as the playbooks and the response plugin write them ----------


async def test_block_in_the_hive_words_reaches_the_agent(
    pair_factory: Any, netns: str
) -> None:
    # addr, port and duration_s (immune.commands), as a `block` decision on
    # an alert about a connect to 192.0.2.7:4444 sends them.
    pair = await pair_factory(actions_netns=netns)
    args = {"addr": "192.0.2.7", "port": 4444, "duration_s": 30}
    row = await pair.command("block", args, hive_words=True)
    assert row["state"] == "succeeded", row["error"]
    assert row["args"] == args  # recorded as the hive said it
    listed = nft_in(netns, "list", "set", "inet", "immune", "block4")
    assert "192.0.2.7" in listed and "timeout 1m30s" in listed  # 30 s + margin
    row = await pair.command(
        "unblock", {"addr": "192.0.2.7", "port": 4444}, hive_words=True
    )
    assert row["state"] == "succeeded", row["error"]
    assert "192.0.2.7" not in nft_in(netns, "list", "set", "inet", "immune", "block4")


async def test_collect_in_the_hive_words_reaches_the_agent(
    pair_factory: Any, sleeper: subprocess.Popen[bytes]
) -> None:
    # A playbook's collect carries the alert id among its args.
    pair = await pair_factory()
    row = await pair.command(
        "collect", {"pid": sleeper.pid, "alert_id": new_id()}, hive_words=True
    )
    assert row["state"] == "succeeded", row["error"]
    assert row["result"]["pid"] == sleeper.pid


async def test_response_thaws_a_frozen_process_when_its_time_is_up(
    pair_factory: Any,
) -> None:
    need(os.geteuid() == 0, "freeze needs root (it moves a process between cgroups)")
    pair = await pair_factory(
        plugins={"response": {"revert_after_s": {"freeze": 1}, "tick_s": 0.1}}
    )
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        origin = cgroup(proc.pid)
        row = await pair.command("freeze", {"pid": proc.pid}, hive_words=True)
        assert row["state"] == "succeeded", row["error"]
        assert cgroup(proc.pid) != origin

        def thawed() -> list[dict[str, Any]]:
            return [
                s
                for s in pair.states
                if s["action"] == "thaw" and s["state"] in signing.FINAL_STATES
            ]

        await until(lambda: bool(thawed()), timeout=15)
        (done,) = thawed()
        assert done["state"] == "succeeded", done["error"]
        assert done["result"]["thawed"] == [proc.pid]
        assert cgroup(proc.pid) == origin and runs(proc.pid)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    ("action", "hive", "agent"),
    [
        (
            "block",
            {"addr": "10.0.0.1", "duration_s": 2.5},
            {"address": "10.0.0.1", "duration": 63},
        ),
        ("block", {"addr": "10.0.0.1", "port": 4444}, {"address": "10.0.0.1"}),
        ("block", {"port": 4444}, {"port": 4444}),
        ("unblock", {"addr": "10.0.0.1", "duration_s": 9}, {"address": "10.0.0.1"}),
        ("isolate", {"duration_s": 10**9}, {"duration": 7 * 24 * 3600}),
        ("collect", {"pid": 5, "alert_id": "a-1"}, {"pid": 5}),
        ("kill", {"pid": 5, "tree": True}, {"pid": 5, "tree": True}),
    ],
)
def test_agent_args_speak_the_agent_words(
    action: str, hive: dict[str, Any], agent: dict[str, Any]
) -> None:
    from immune.plugins.network_commands import agent_args

    assert agent_args(action, hive) == agent


async def test_isolate_keeps_the_broker_in_the_agent_netns(
    pair_factory: Any, netns: str, mqtt_broker: str
) -> None:
    pair = await pair_factory(actions_netns=netns)
    port = int(mqtt_broker.rsplit(":", 1)[1])
    row = await pair.command("isolate", {})
    assert row["state"] == "succeeded", row["error"]
    assert ["127.0.0.1", port, "tcp"] in row["result"]["allowed"]
    out = nft_in(netns, "list", "chain", "inet", "immune", "isolate_out")
    assert f"ip daddr 127.0.0.1 tcp dport {port} accept" in out and "drop" in out
    assert pair.running.agent.connected.is_set()  # it is not the host's network

    row = await pair.command("unisolate", {})
    assert row["state"] == "succeeded", row["error"]
    out = nft_in(netns, "list", "chain", "inet", "immune", "isolate_out")
    assert "drop" not in out
