"""Mutual TLS with ``immune pki`` certificates and the shipped Mosquitto config.

The broker runs contrib/mosquitto/mosquitto.conf and its ACL, with only the
paths and the port changed for the test.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from pathlib import Path

import aiomqtt
import pytest
from typer.testing import CliRunner

from immune import pki
from immune.cli import app
from immune.config import MqttConfig
from immune.errors import ConfigError
from immune.events import Event, encode, new_id, now_ns
from immune.mqtt import parse_url, tls_context

from .conftest import agent_config, hive_config, until

CONTRIB = Path(__file__).parents[2] / "contrib" / "mosquitto"
PREFIX = "immune/v1"  # the shipped ACL's prefix


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    result = CliRunner().invoke(app, ["pki", "ca", "--dir", str(directory)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(
        app, ["pki", "broker", "--dir", str(directory), "--host", "127.0.0.1"]
    )
    assert result.exit_code == 0, result.output
    pki.issue(directory, pki.HIVE_NAME, basename="hive")
    result = CliRunner().invoke(
        app, ["pki", "client", "immune-integrator", "--dir", str(directory)]
    )
    assert result.exit_code == 0, result.output
    pki.issue_agent(directory, "agent-a")
    pki.issue_agent(directory, "agent-b")
    assert (directory / "agent-agent-a.key").stat().st_mode & 0o777 == 0o600
    return directory


def shipped_config(certs: Path, state: Path) -> str:
    text = (CONTRIB / "mosquitto.conf").read_text()
    (certs / "acl").write_text((CONTRIB / "acl").read_text())
    text = text.replace("/etc/mosquitto/immune/", f"{certs}/")
    text = text.replace("/var/lib/mosquitto/", f"{state}/")
    assert "listener 8883\n" in text
    return text.replace("listener 8883\n", "listener {port} 127.0.0.1\n")


def tls(certs: Path, who: str) -> MqttConfig:
    return MqttConfig(
        ca_file=str(certs / "ca.pem"),
        cert_file=str(certs / f"{who}.pem"),
        key_file=str(certs / f"{who}.key"),
    )


def client(url: str, certs: Path, who: str) -> aiomqtt.Client:
    address = parse_url(url)
    return aiomqtt.Client(
        address.host,
        address.port,
        identifier=f"test-{who}-{new_id()[-8:]}",
        tls_context=tls_context(tls(certs, who)),
    )


def batch(agent_id: str, n: int) -> bytes:
    event = Event(
        id=new_id(),
        agent_id=agent_id,
        host=agent_id,
        ts=now_ns(),
        kind="exec",
        pid=n,
        sensor="test",
    )
    return encode({"v": 1, "agent_id": agent_id, "events": [event]})


def test_pki_refuses_to_overwrite_a_ca(certs: Path) -> None:
    with pytest.raises(ConfigError, match="already exists"):
        pki.create_ca(certs)


def test_pki_agent_certificate_names_the_agent(certs: Path) -> None:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate((certs / "agent-agent-a.pem").read_bytes())
    (cn,) = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert cn.value == "agent-a"


def test_tls_files_missing_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ca_file"):
        tls_context(MqttConfig(ca_file=str(tmp_path / "nope.pem")))
    with pytest.raises(ConfigError, match="set together"):
        tls_context(MqttConfig(cert_file=__file__))


@pytest.mark.mqtt
async def test_mutual_tls_end_to_end_and_acl_per_agent(
    tmp_path: Path, certs: Path, mosquitto, hive_factory, agent_factory
) -> None:
    state = tmp_path / "broker-state"
    state.mkdir()
    broker = mosquitto(full=shipped_config(certs, state))
    url = f"mqtts://127.0.0.1:{broker.port}"

    # Hive and agent over mutual TLS: events arrive and are stored.
    config = hive_config(tmp_path, f"sqlite:///{tmp_path / 'hive.db'}", url, PREFIX)
    config.mqtt = MqttConfig(
        **{**_fields(config.mqtt), **_fields(tls(certs, "hive"), tls_only=True)}
    )
    config.mqtt.shared_group = "hives"  # MQTT 5 and $share/ under the ACL too
    hive = await hive_factory(config)
    a_config = agent_config(tmp_path, url, PREFIX, id="agent-a")
    a_config.mqtt = MqttConfig(
        **{
            **_fields(a_config.mqtt),
            **_fields(tls(certs, "agent-agent-a"), tls_only=True),
        }
    )
    running = await agent_factory(a_config)
    await until(lambda: hive.store.counts()["events"] >= 1)
    await until(lambda: len(running.agent.spool) == 0)  # receipts came back too

    # Agent A's certificate publishing on agent B's topic: the broker drops
    # it (the hive, subscribed to everything, never sees it); on its own
    # topic it goes through, after the refused one.
    async with client(url, certs, "agent-agent-a") as rogue:
        await rogue.publish(
            f"{PREFIX}/agents/agent-b/events", batch("agent-b", 1), qos=1
        )
        await rogue.publish(
            f"{PREFIX}/agents/agent-a/events", batch("agent-a", 2), qos=1
        )
    await until(
        lambda: any(e["pid"] == 2 for e in hive.store.events(agent_id="agent-a"))
    )
    await hive.store.flush()
    assert hive.store.events(agent_id="agent-b") == []
    # The broker's own word: not authorised (reason code 135) for message 1.
    assert re.search(r"PUBACK to test-agent-agent-a-\S+ \(m1, rc135\)", broker.log())

    # Agent B may not read A's commands either: the broker does not deliver
    # them, while B's own come through.
    async with client(url, certs, "agent-agent-b") as nosy:
        await nosy.subscribe(f"{PREFIX}/agents/agent-a/commands", qos=1)
        await nosy.subscribe(f"{PREFIX}/agents/agent-b/commands", qos=1)
        async with client(url, certs, "hive") as sender:
            await sender.publish(f"{PREFIX}/agents/agent-a/commands", b"for a", qos=1)
            await sender.publish(f"{PREFIX}/agents/agent-b/commands", b"for b", qos=1)
        async with asyncio.timeout(5):
            message = await anext(aiter(nosy.messages))
        assert message.payload == b"for b"

    # An integrator reads alerts and may not write an agent's events.
    async with client(url, certs, "immune-integrator") as integrator:
        await integrator.subscribe(f"{PREFIX}/alerts/#", qos=1)
        await integrator.publish(
            f"{PREFIX}/agents/agent-a/events", batch("agent-a", 9), qos=1
        )
        async with client(url, certs, "hive") as sender:
            await sender.publish(f"{PREFIX}/alerts/high", b"{}", qos=1)
        async with asyncio.timeout(5):
            message = await anext(aiter(integrator.messages))
        assert str(message.topic) == f"{PREFIX}/alerts/high"
    assert re.search(
        r"PUBACK to test-immune-integrator-\S+ \(m2, rc135\)", broker.log()
    )

    # No certificate: no connection.
    address = parse_url(url)
    bare = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(
            address.host, address.port, tls_context=bare, timeout=2
        ) as c:
            await c.publish(
                f"{PREFIX}/agents/agent-a/events", batch("agent-a", 3), qos=1
            )
            await asyncio.sleep(0.5)
            await c.publish(
                f"{PREFIX}/agents/agent-a/events", batch("agent-a", 4), qos=1
            )


@pytest.mark.mqtt
async def test_hive_drops_event_of_another_agent_than_its_topic(
    tmp_path: Path, mqtt_broker: str, mqtt_prefix: str, hive_factory
) -> None:
    config = hive_config(
        tmp_path, f"sqlite:///{tmp_path / 'hive.db'}", mqtt_broker, mqtt_prefix
    )
    config.mqtt.persistent_session = False
    hive = await hive_factory(config)
    address = parse_url(mqtt_broker)
    async with aiomqtt.Client(address.host, address.port) as c:
        await c.publish(
            f"{mqtt_prefix}/agents/agent-b/events", batch("agent-a", 1), qos=1
        )
    await until(lambda: hive.metrics.get("events.rejected") == 1)
    await hive.store.flush()
    (letter,) = hive.store.dead_letters()
    assert "claims agent 'agent-a'" in letter["reason"]
    assert hive.store.counts()["events"] == 0


def _fields(config: MqttConfig, tls_only: bool = False) -> dict[str, object]:
    names = (
        ("ca_file", "cert_file", "key_file") if tls_only else config.__struct_fields__
    )
    return {name: getattr(config, name) for name in names}
