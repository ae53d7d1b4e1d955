"""``immune replay FILE``: analyse a recorded audit.log with the hive.

The file's records are grouped into IMMUNE events (see
:mod:`immune.agent.auditlog`) and published, in batches, on the events topic
of an agent named by ``--agent-id``, so the hive stores and judges them as it
would a live agent's. ``--json`` prints them instead, one per line.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import aiomqtt
import orjson
import typer
from rich.markup import escape

from immune import topics
from immune.agent.auditlog import Assembler, read_log
from immune.config import Config
from immune.errors import ConfigError, EventError, ImmuneError
from immune.events import SCHEMA_VERSION, Event, encode, parse_event, to_dict
from immune.mqtt import client_kwargs, parse_url

logger = logging.getLogger(__name__)

BATCH = 500
#: Unreadable lines listed at most, before "and N more".
SHOWN_ERRORS = 10


class ReplayError(ImmuneError):
    """A replay could not be done (file, broker)."""


def events_of(path: Path, agent_id: str, errors: list[str]) -> Iterator[Event]:
    """The events of an audit.log file; lines that are not records go to errors.

    Raises:
        ReplayError: the file cannot be read.
    """
    # The host is the file's (a record's node=), not the one replaying it.
    assembler = Assembler(agent_id=agent_id, host=agent_id, sensor="replay")
    try:
        with path.open(encoding="utf-8", errors="backslashreplace") as lines:
            for event in read_log(lines, assembler, errors):
                # What the hive would refuse is refused here, with its reason.
                try:
                    yield parse_event(to_dict(event))
                except EventError as exc:
                    serial = (event.extra or {}).get("audit_serial")
                    errors.append(f"audit event {serial}: {exc}")
    except OSError as exc:
        raise ReplayError(f"cannot read {path}: {exc.strerror}") from None


async def publish(config: Config, agent_id: str, events: Iterator[Event]) -> int:
    """Publish the events in batches on the agent's events topic; the count.

    Raises:
        ReplayError: the broker is unreachable.
    """
    if not config.mqtt.url:
        raise ConfigError("mqtt.url is empty: replay needs the broker's URL")
    address = parse_url(config.mqtt.url)
    topic = topics.agent_topic(config.mqtt.topic_prefix, agent_id, topics.EVENTS)
    sent = 0
    try:
        async with aiomqtt.Client(
            identifier=f"immune-replay-{agent_id}",
            **client_kwargs(config.mqtt, address),
        ) as client:
            batch: list[Event] = []
            for event in events:
                batch.append(event)
                if len(batch) >= BATCH:
                    sent += await _send(client, topic, agent_id, batch)
                    batch = []
            if batch:
                sent += await _send(client, topic, agent_id, batch)
    except aiomqtt.MqttError as exc:
        msg = f"MQTT broker {address} unavailable ({exc}); {sent} events were sent"
        raise ReplayError(msg) from None
    return sent


async def _send(
    client: aiomqtt.Client, topic: str, agent_id: str, batch: list[Event]
) -> int:
    payload = encode({"v": SCHEMA_VERSION, "agent_id": agent_id, "events": batch})
    await client.publish(topic, payload, qos=1)
    return len(batch)


def replay(
    file: Annotated[Path, typer.Argument(help="An audit.log file.")],
    agent_id: Annotated[
        str,
        typer.Option("--agent-id", help="The agent the events are published as."),
    ] = "replay",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the events instead of sending them.")
    ] = False,
) -> None:
    """Turn a recorded audit.log into events and send them to the hive."""
    from immune.cli import _config, console, err_console

    if not topics.is_valid_agent_id(agent_id):
        msg = f"--agent-id {agent_id!r}: use letters, digits and ._:- only"
        raise ConfigError(msg)
    if not file.is_file():
        raise ReplayError(f"{file} is not a file")
    errors: list[str] = []
    events = events_of(file, agent_id, errors)
    if as_json:
        count = 0
        for event in events:
            sys.stdout.write(orjson.dumps(to_dict(event)).decode() + "\n")
            count += 1
    else:
        count = asyncio.run(publish(_config(), agent_id, events))
    for line in errors[:SHOWN_ERRORS]:
        err_console.print(
            f"[yellow]skipped[/] {escape(line)}", highlight=False, soft_wrap=True
        )
    if len(errors) > SHOWN_ERRORS:
        err_console.print(f"[yellow]skipped[/] {len(errors) - SHOWN_ERRORS} more")
    where = "printed" if as_json else f"sent as agent {agent_id}"
    (err_console if as_json else console).print(
        f"{count} events {where} from {escape(str(file))}; {len(errors)} skipped.",
        highlight=False,
        soft_wrap=True,
    )
    if errors and count == 0:
        raise ReplayError(f"{file} holds no audit records; is it an audit.log?")
