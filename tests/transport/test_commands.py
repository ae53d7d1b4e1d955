"""Signed commands: the agent's checks, and hive to agent and back for real."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from immune import signing
from immune.agent.commands import CommandRunner
from immune.config import Config
from immune.errors import ConfigError
from immune.events import new_id, now_ns
from immune.metrics import Metrics

from .conftest import agent_config, hive_config, until

SECOND = 10**9


def command(agent_id: str = "a1", **fields: Any) -> signing.Command:
    values: dict[str, Any] = {
        "id": new_id(),
        "agent_id": agent_id,
        "action": "ping",
        "issued_ns": now_ns(),
        "expires_ns": now_ns() + 60 * SECOND,
    }
    values.update(fields)
    return signing.Command(**values)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Ed25519PrivateKey, Config]:
    key = signing.load_or_create_key(tmp_path / "hive.key")
    (tmp_path / "hive.pub").write_bytes(signing.public_pem(key))
    config = Config()
    config.agent.id = "a1"
    config.agent.command_public_key = str(tmp_path / "hive.pub")
    return key, config


def runner(config: Config) -> CommandRunner:
    return CommandRunner(config, "a1", Metrics())


MINE = "immune/v1/agents/a1/commands"


def test_command_key_is_made_private_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "k" / "command.key"
    key = signing.load_or_create_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    again = signing.load_or_create_key(path)
    assert signing.public_pem(again) == signing.public_pem(key)


def test_command_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "command.key"
    signing.load_or_create_key(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        signing.load_or_create_key(path)


def test_command_signed_by_the_hive_is_accepted(keys) -> None:
    key, config = keys
    sent = command()
    got = runner(config).check(MINE, signing.sign(key, sent), now_ns())
    assert got == sent


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda k: signing.sign(Ed25519PrivateKey.generate(), command()), "bad sig"),
        (lambda k: signing.sign(k, command(expires_ns=now_ns() - 1)), "expired"),
        (lambda k: signing.sign(k, command(agent_id="b2")), "for agent 'b2'"),
        (lambda k: signing.sign(k, command(action="format_disk")), "unknown action"),
        (
            lambda k: signing.sign(k, command(expires_ns=now_ns() + 10**6 * SECOND)),
            "too far ahead",
        ),
        (lambda k: b'{"v":1,"body":"{}","sig":""}', "malformed"),
        (lambda k: b" " * 70_000, "exceeds"),
    ],
)
def test_command_refused_with_its_reason(keys, make, reason: str) -> None:
    key, config = keys
    with pytest.raises(signing.CommandRefusedError, match=reason):
        runner(config).check(MINE, make(key), now_ns())


def test_command_unsigned_body_tampered_is_refused(keys) -> None:
    key, config = keys
    payload = signing.sign(key, command()).replace(b"ping", b"kill")
    with pytest.raises(signing.CommandRefusedError, match="bad signature") as info:
        runner(config).check(MINE, payload, now_ns())
    assert info.value.command_id is not None  # so the refusal is acknowledged


def test_command_replayed_is_refused_until_it_expires(keys) -> None:
    key, config = keys
    check = runner(config)
    payload = signing.sign(key, command())
    check.check(MINE, payload, now_ns())
    with pytest.raises(signing.CommandRefusedError, match="replayed"):
        check.check(MINE, payload, now_ns())
    with pytest.raises(signing.CommandRefusedError, match="expired"):
        check.check(MINE, payload, now_ns() + 61 * SECOND)


def test_command_for_all_only_on_the_broadcast_topic(keys) -> None:
    key, config = keys
    check = runner(config)
    everyone = command(agent_id="*")
    assert check.check(
        "immune/v1/broadcast/commands", signing.sign(key, everyone), now_ns()
    )
    with pytest.raises(signing.CommandRefusedError, match="came on topic"):
        check.check(MINE, signing.sign(key, command(agent_id="*")), now_ns())


def test_command_without_public_key_is_refused(keys) -> None:
    key, _ = keys
    with pytest.raises(signing.CommandRefusedError, match="no hive public key"):
        runner(Config()).check(MINE, signing.sign(key, command()), now_ns())


# --- Hive to agent and back, over a real broker ---------------------------


@pytest.mark.mqtt
async def test_commands_end_to_end_ping_replay_expiry_foreign_key(
    tmp_path: Path, mqtt_broker: str, mqtt_prefix: str, hive_factory, agent_factory
) -> None:
    config = hive_config(
        tmp_path, f"sqlite:///{tmp_path / 'hive.db'}", mqtt_broker, mqtt_prefix
    )
    hive = await hive_factory(config)
    states: list[dict[str, Any]] = []
    hive.bus.subscribe("command.state", states.append, owner="test")
    key = signing.load_or_create_key(config.hive.command_key)
    (tmp_path / "hive.pub").write_bytes(signing.public_pem(key))
    running = await agent_factory(
        agent_config(
            tmp_path,
            mqtt_broker,
            mqtt_prefix,
            command_public_key=str(tmp_path / "hive.pub"),
        )
    )
    agent_id = running.agent.agent_id

    def final(command_id: str) -> dict[str, Any] | None:
        row = hive.store.command(command_id)
        return row if row and row["state"] in signing.FINAL_STATES else None

    # A ping through the bus contract: sent, acknowledged, succeeded.
    ping = {
        "id": new_id(),
        "agent_id": agent_id,
        "action": "ping",
        "args": {"echo": "hello"},
        "expires_ns": now_ns() + 30 * SECOND,
        "origin": "test",
        "alert_id": None,
    }
    await hive.publish("command.send", ping)
    await until(lambda: final(ping["id"]) is not None)
    row = hive.store.command(ping["id"])
    assert row["state"] == "succeeded" and row["result"]["echo"] == "hello"
    assert row["origin"] == "test"

    def seen() -> list[str]:
        return [s["state"] for s in states if s["id"] == ping["id"]]

    await until(lambda: len(seen()) == 3)  # the bus follows the table
    assert seen() == ["sent", "acknowledged", "succeeded"]

    # The same signed message again (a replay by someone on the broker).
    import aiomqtt

    from immune.mqtt import parse_url

    address = parse_url(mqtt_broker)
    topic = f"{mqtt_prefix}/agents/{agent_id}/commands"
    async with aiomqtt.Client(address.host, address.port) as client:
        replayed = signing.Command(
            id=ping["id"],
            agent_id=agent_id,
            action="ping",
            issued_ns=now_ns(),
            expires_ns=ping["expires_ns"],
        )
        await hive.store.update_command(ping["id"], "sent")
        await client.publish(topic, signing.sign(key, replayed), qos=1)
        await until(lambda: final(ping["id"]) is not None)
        assert hive.store.command(ping["id"])["state"] == "refused"
        assert hive.store.command(ping["id"])["error"] == "command replayed"

        # Signed with another key: refused, and the hive records why.
        forged_id = new_id()
        await hive.store.add_command(
            agent_id,
            "ping",
            {},
            command_id=forged_id,
            expires_ns=now_ns() + 30 * SECOND,
        )
        forged = signing.Command(
            id=forged_id,
            agent_id=agent_id,
            action="ping",
            issued_ns=now_ns(),
            expires_ns=now_ns() + 30 * SECOND,
        )
        other = Ed25519PrivateKey.generate()
        await client.publish(topic, signing.sign(other, forged), qos=1)
        await until(lambda: final(forged_id) is not None)
        assert hive.store.command(forged_id)["state"] == "refused"
        assert hive.store.command(forged_id)["error"] == "bad signature"

        # Expired when it reaches the agent (held back by an attacker, say).
        stale_id = new_id()
        await hive.store.add_command(
            agent_id, "ping", {}, command_id=stale_id, expires_ns=now_ns() - SECOND
        )
        stale = signing.Command(
            id=stale_id,
            agent_id=agent_id,
            action="ping",
            issued_ns=now_ns() - 2 * SECOND,
            expires_ns=now_ns() - SECOND,
        )
        await client.publish(topic, signing.sign(key, stale), qos=1)
        await until(lambda: final(stale_id) is not None)
        assert hive.store.command(stale_id)["state"] == "refused"
        assert hive.store.command(stale_id)["error"] == "command expired"

    # Expired on arrival at the hive: never sent, recorded as timed out.
    late = {**ping, "id": new_id(), "expires_ns": now_ns() - SECOND}
    await hive.publish("command.send", late)
    await until(lambda: final(late["id"]) is not None)
    assert hive.store.command(late["id"])["state"] == "timed_out"

    # To an agent that does not answer: timed out once it expires.
    silent = {
        **ping,
        "id": new_id(),
        "agent_id": "nobody-here",
        "expires_ns": now_ns() + SECOND,
    }
    await hive.publish("command.send", silent)
    await until(lambda: final(silent["id"]) is not None, timeout=5)
    assert hive.store.command(silent["id"])["state"] == "timed_out"
    assert running.agent.metrics.get("agent.commands_refused") == 3


@pytest.mark.mqtt
async def test_command_to_every_agent_records_each_answer(
    tmp_path: Path, mqtt_broker: str, mqtt_prefix: str, hive_factory, agent_factory
) -> None:
    config = hive_config(
        tmp_path, f"sqlite:///{tmp_path / 'hive.db'}", mqtt_broker, mqtt_prefix
    )
    hive = await hive_factory(config)
    key = signing.load_or_create_key(config.hive.command_key)
    (tmp_path / "hive.pub").write_bytes(signing.public_pem(key))
    agents = [
        await agent_factory(
            agent_config(
                tmp_path,
                mqtt_broker,
                mqtt_prefix,
                command_public_key=str(tmp_path / "hive.pub"),
            )
        )
        for _ in range(2)
    ]
    command_id = new_id()
    await hive.publish(
        "command.send",
        {
            "id": command_id,
            "agent_id": "*",
            "action": "ping",
            "args": {},
            "expires_ns": now_ns() + 30 * SECOND,
            "origin": "test",
            "alert_id": None,
        },
    )

    def answered() -> set[str]:
        row = hive.store.command(command_id) or {}
        results = row.get("result") or {}
        return {a for a, r in results.items() if r["state"] == "succeeded"}

    await until(lambda: answered() == {a.agent.agent_id for a in agents})


async def test_command_send_invalid_is_a_dead_letter(tmp_path: Path) -> None:
    from immune.hive import Hive

    config = hive_config(
        tmp_path, f"sqlite:///{tmp_path / 'hive.db'}", "mqtt://127.0.0.1:9", "p"
    )
    hive = Hive(config, discover=False)
    from immune.plugins.network import NetworkPlugin

    plugin = NetworkPlugin()
    plugin.immune_configure(hive)
    await asyncio.to_thread(hive.store.upgrade)
    await plugin.desk.send({"id": "x", "agent_id": "has space", "action": "ping"})
    await hive.store.flush()
    (letter,) = hive.store.dead_letters()
    assert letter["source"] == "command.send" and "invalid command" in letter["reason"]
    assert hive.metrics.get("commands.invalid") == 1
    hive.store.close()


def test_immune_up_gives_its_agent_the_hive_public_key(_state_dir: Path) -> None:
    from immune.runner import _share_command_key

    config = Config()
    config.agent.id = "a1"
    _share_command_key(config)
    assert config.agent.command_public_key == str(_state_dir / "command.pub")
    key = signing.load_or_create_key(_state_dir / "command.key")
    assert runner(config).check(MINE, signing.sign(key, command()), now_ns())


async def test_command_key_readable_by_others_fails_the_network_start(
    tmp_path: Path,
) -> None:
    from immune.hive import Hive
    from immune.plugins.network import NetworkPlugin

    config = hive_config(
        tmp_path, f"sqlite:///{tmp_path / 'hive.db'}", "mqtt://127.0.0.1:9", "p"
    )
    signing.load_or_create_key(config.hive.command_key)
    Path(config.hive.command_key).chmod(0o640)
    plugin = NetworkPlugin()
    hive = Hive(config, discover=False)
    plugin.immune_configure(hive)  # nothing read yet: `immune plugins` is harmless
    with pytest.raises(ConfigError, match="chmod 600"):
        plugin.immune_start(hive)
    hive.store.close()


def test_command_replayed_after_an_agent_restart_is_refused(keys, tmp_path) -> None:
    from immune.agent.spool import Spool

    key, config = keys
    payload = signing.sign(key, command())
    first = runner(config)
    first.attach(Spool(tmp_path / "agent.spool", 10))
    first.check(MINE, payload, now_ns())
    first.memory.close()

    restarted = runner(config)
    restarted.attach(Spool(tmp_path / "agent.spool", 10))
    with pytest.raises(signing.CommandRefusedError, match="replayed"):
        restarted.check(MINE, payload, now_ns())
    restarted.memory.close()
    # Expired ids are forgotten on reopening: the memory stays small.
    spool = Spool(tmp_path / "agent.spool", 10)
    assert spool.remembered_commands(now_ns() + 120 * SECOND) == {}
