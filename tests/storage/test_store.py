"""The Store on both databases: batching, deduplication, upserts, reads."""

from __future__ import annotations

import hashlib

import msgspec
import pytest

from immune.config import StorageConfig
from immune.errors import StorageError
from immune.events import Alert, parse_event, to_dict
from immune.storage import Store
from immune.storage.models import MAX_DEAD_LETTER_PAYLOAD

from .conftest import T0, make_alert, make_event

CONTROL = "".join(chr(c) for c in range(1, 32)) + "\x7f"


def _is_pg(store: Store) -> bool:
    return store.url.get_backend_name() == "postgresql"


async def test_store_event_roundtrip(store: Store) -> None:
    events = [
        make_event(
            argv=["sh", "-c", "echo 'héllo wörld' | grep -v ☃", "", "--x=1 2"],
            comm="ünïcødé",
            path="/tmp/\u202eevil\u202c.txt",
            uid=2**32 - 1,
            euid=0,
            extra={"n": 1, "f": 0.5, "b": True, "z": None, "s": "日本語 🦠"},
        ),
        make_event(kind="connect", argv=None, addr="::1", port=443, family="inet6"),
        make_event(comm=CONTROL, exe="/bin/\t\n\r", argv=[CONTROL, "\\", '"']),
        make_event(outcome="blocked", severity="critical", sensor="cn_proc"),
    ]
    await store.add_events(events)
    await store.flush()

    stored = store.events(limit=None)
    assert stored == [to_dict(e) for e in reversed(events)]
    assert [parse_event(d) for d in stored] == list(reversed(events))


async def test_store_events_columns_hold_the_fields(store: Store) -> None:
    event = make_event(kind="connect", addr="10.0.0.1", port=22, family="inet")
    await store.add_event(event)
    await store.flush()

    import sqlalchemy as sa

    from immune.storage import models

    with store._reader.connect() as conn:
        row = conn.execute(sa.select(models.events)).one()._mapping
    assert (row["kind"], row["addr"], row["port"], row["family"]) == (
        "connect",
        "10.0.0.1",
        22,
        "inet",
    )
    assert row["argv"] == ["true"]
    assert (row["outcome"], row["severity"], row["sensor"]) == (
        "allowed",
        "info",
        "unknown",
    )
    assert row["received_at"] > event.ts


async def test_store_duplicate_ids_in_one_batch_stored_once(store: Store) -> None:
    first = make_event()
    copy = msgspec.structs.replace(first, host="elsewhere")
    await store.add_events([first, copy, make_event(), first])
    await store.flush()

    assert store.counts()["events"] == 2
    assert store.metrics.get("storage.events_written") == 2
    assert store.metrics.get("storage.events_duplicate") == 2
    assert store.metrics.get("storage.flushes") == 1


async def test_store_duplicate_ids_across_batches_stored_once(store: Store) -> None:
    first = make_event()
    await store.add_event(first)
    await store.flush()
    await store.add_event(msgspec.structs.replace(first, host="elsewhere"))
    await store.flush()

    assert store.counts()["events"] == 1
    assert store.events()[0]["host"] == first.host  # the first one is kept
    assert store.metrics.get("storage.flushes") == 2


async def test_store_alert_stored_again_updates_count(store: Store) -> None:
    alert = make_alert(count=1, data={"last": 1}, event_ids=["a"])
    await store.add_alert(alert)
    await store.flush()
    bumped = msgspec.structs.replace(
        alert, ts=alert.ts + 99, count=7, data={"last": 7}, event_ids=["a", "b"]
    )
    await store.add_alert(bumped)
    await store.flush()

    (stored,) = store.alerts()
    assert stored["count"] == 7
    assert stored["data"] == {"last": 7}
    assert stored["event_ids"] == ["a", "b"]
    assert stored["ts"] == alert.ts  # first seen
    assert store.metrics.get("storage.alerts_written") == 2


async def test_store_alert_queued_twice_keeps_the_latest(store: Store) -> None:
    alert = make_alert(count=2)
    await store.add_alert(alert)
    await store.add_alert(msgspec.structs.replace(alert, count=3))
    assert store.pending == 1
    await store.flush()

    (stored,) = store.alerts()
    assert stored["count"] == 3
    assert msgspec.convert(stored, Alert) == msgspec.structs.replace(alert, count=3)


async def test_store_dead_letter_keeps_reason_size_and_hash(store: Store) -> None:
    small = b'{"not": json'
    big = bytes(range(256)) * 1024  # 256 KiB, NUL bytes included
    await store.add_dead_letter("immune/v1/agent/a1/events", "not JSON", small)
    await store.add_dead_letter("plugin:dedup", "too big", big)
    await store.add_dead_letter("immune/v1/x", "bad\x00reason", None, raw={"pid": "x"})
    await store.add_dead_letter("immune/v1/y", "nothing", None)
    await store.flush()

    nothing, raw, large, first = store.dead_letters()
    assert (first["source"], first["reason"]) == (
        "immune/v1/agent/a1/events",
        "not JSON",
    )
    assert first["payload"] == small
    assert first["payload_size"] == len(small)
    assert first["sha256"] == hashlib.sha256(small).hexdigest()
    assert first["truncated"] is False

    assert large["payload"] == big[:MAX_DEAD_LETTER_PAYLOAD]
    assert large["payload_size"] == len(big)
    assert large["sha256"] == hashlib.sha256(big).hexdigest()
    assert large["truncated"] is True

    assert raw["payload"] == b'{"pid":"x"}'
    assert raw["reason"] == "bad\\x00reason"
    assert (nothing["payload"], nothing["payload_size"]) == (b"", 0)
    assert store.metrics.get("storage.deadletters_written") == 4


async def test_store_row_refused_alone_becomes_dead_letter(store: Store) -> None:
    good = [make_event(), make_event()]
    too_big = make_alert(count=2**70)  # no INTEGER column takes it
    fine = make_alert()
    await store.add_events(good)
    await store.add_alert(too_big)
    await store.add_alert(fine)
    await store.flush()

    assert store.counts()["events"] == 2
    assert [a["id"] for a in store.alerts()] == [fine.id]
    (dead,) = store.dead_letters()
    assert dead["source"] == "storage:alerts"
    assert "refused" in dead["reason"]
    assert msgspec.json.decode(dead["payload"], type=Alert) == too_big
    assert store.metrics.get("storage.rejected_rows") == 1


async def test_store_text_postgresql_refuses_is_dead_lettered(store: Store) -> None:
    # PostgreSQL stores no NUL in text, nor a value longer than its column;
    # SQLite stores both. Neither may hold back the rest of the batch.
    nul = make_event(comm="a\x00b")
    long_id = make_event(id="x" * 200)
    ok = make_event()
    await store.add_events([nul, long_id, ok])
    await store.flush()

    if _is_pg(store):
        assert store.events() == [to_dict(ok)]
        dead = store.dead_letters()
        assert [d["source"] for d in dead] == ["storage:events"] * 2
        payloads = [msgspec.json.decode(d["payload"]) for d in dead]
        assert {p["id"]: p for p in payloads} == {
            nul.id: to_dict(nul),
            long_id.id: to_dict(long_id),
        }
        assert store.metrics.get("storage.rejected_rows") == 2
    else:
        assert store.counts()["events"] == 3
        assert {e["id"]: e.get("comm") for e in store.events()}[nul.id] == "a\x00b"
        assert store.counts()["dead_letters"] == 0


async def test_store_stop_writes_everything(db_url: str) -> None:
    # Neither the interval nor the batch size would flush before stop().
    config = StorageConfig(batch_size=10_000, flush_interval=3600, max_pending=20_000)
    store = Store(db_url, config=config)
    try:
        store.upgrade()
        await store.start()
        events = [make_event() for _ in range(1234)]
        await store.add_events(events)
        await store.add_alert(make_alert())
        await store.add_dead_letter("t", "r", b"p")
        assert store.counts()["events"] == 0
        assert store.pending == 1236

        await store.stop()

        assert store.pending == 0
        counts = store.counts()
        assert (counts["events"], counts["alerts"], counts["dead_letters"]) == (
            1234,
            1,
            1,
        )
        assert store.metrics.snapshot()["storage.pending"] == 0
    finally:
        store.close()


async def test_store_background_writer_flushes_full_batches(db_url: str) -> None:
    config = StorageConfig(batch_size=10, flush_interval=3600)
    store = Store(db_url, config=config)
    try:
        store.upgrade()
        await store.start()
        await store.add_events([make_event() for _ in range(25)])
        # 25 rows pending wake the writer although the interval is an hour.
        from .conftest import wait_until

        await wait_until(lambda: store.metrics.get("storage.events_written") >= 20)
        assert store.metrics.get("storage.flushes") >= 2
    finally:
        await store.stop()
        store.close()
    assert store.metrics.get("storage.events_written") == 25


async def test_store_start_refuses_a_database_without_schema(db_url: str) -> None:
    store = Store(db_url)
    try:
        with pytest.raises(StorageError, match="no schema.*immune db upgrade"):
            await store.start()
        store.upgrade()
        store.check_ready()
    finally:
        store.close()


def test_store_check_ready_on_an_unreachable_database(tmp_path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}")
    try:
        with pytest.raises(StorageError, match="cannot reach"):
            store.check_ready()
    finally:
        store.close()


async def test_store_read_filters(store: Store) -> None:
    a1 = [make_event(agent_id="a1", ts=T0 + i, kind="exec") for i in range(5)]
    a2 = [make_event(agent_id="a2", ts=T0 + 10 + i, kind="connect") for i in range(5)]
    await store.add_events(a1 + a2)
    await store.add_alert(make_alert(severity="low", agent_id="a1", ts=T0 + 1))
    await store.add_alert(make_alert(severity="medium", agent_id="a2", ts=T0 + 2))
    await store.add_alert(make_alert(severity="critical", agent_id="a2", ts=T0 + 3))
    await store.add_alert(make_alert(severity="info", ts=T0 + 4))
    await store.flush()

    def ids(rows: list[dict]) -> list[str]:
        return [row["id"] for row in rows]

    assert ids(store.events(limit=3)) == ids(map(to_dict, a2[::-1][:3]))
    assert ids(store.events(kind="exec")) == [e.id for e in a1[::-1]]
    assert ids(store.events(agent_id="a2", limit=None)) == [e.id for e in a2[::-1]]
    assert ids(store.events(since_ns=T0 + 3, until_ns=T0 + 11)) == [
        a2[0].id,
        a1[4].id,
        a1[3].id,
    ]
    assert store.events(kind="bind") == []

    assert [a["severity"] for a in store.alerts()] == [
        "info",
        "critical",
        "medium",
        "low",
    ]
    assert [a["severity"] for a in store.alerts(min_severity="medium")] == [
        "critical",
        "medium",
    ]
    assert [a["severity"] for a in store.alerts(agent_id="a2", since_ns=T0 + 3)] == [
        "critical"
    ]
    assert len(store.alerts(limit=1)) == 1
    with pytest.raises(ValueError, match="unknown severity"):
        store.alerts(min_severity="urgent")
    with pytest.raises(ValueError, match="limit"):
        store.events(limit=0)

    counts = store.counts()
    assert counts == {
        "agents": 0,
        "alerts": 4,
        "commands": 0,
        "dead_letters": 0,
        "events": 10,
        "plugin_state": 0,
        "playbook_runs": 0,
        "response_commands": 0,
    }


async def test_store_agents_upsert_and_status(store: Store) -> None:
    await store.upsert_agent("a1", hostname="h1", os="Linux", sensors=["proc"])
    (first,) = store.agents()
    await store.upsert_agent("a1", version="0.2")
    (again,) = store.agents()

    assert again["hostname"] == "h1"  # kept when not given
    assert (again["version"], again["sensors"], again["status"]) == (
        "0.2",
        ["proc"],
        "online",
    )
    assert again["first_seen"] == first["first_seen"]
    assert again["last_seen"] > first["last_seen"]

    assert await store.set_agent_status("a1", "offline") is True
    assert store.agents()[0]["status"] == "offline"
    assert store.agents()[0]["last_seen"] == again["last_seen"]
    assert await store.set_agent_status("nobody", "offline") is False
    with pytest.raises(ValueError, match="status"):
        await store.set_agent_status("a1", "asleep")
    with pytest.raises(TypeError, match="colour"):
        await store.upsert_agent("a1", colour="red")


async def test_store_commands(store: Store) -> None:
    cid = await store.add_command("a1", "kill", {"pid": 42}, expires_ns=T0)
    other = await store.add_command("a2", "isolate", command_id="cmd-2")
    assert other == "cmd-2"

    assert await store.update_command(cid, "sent") is True
    assert await store.update_command(cid, "succeeded", {"killed": True}) is True
    assert await store.update_command("missing", "failed") is False
    with pytest.raises(ValueError, match="state"):
        await store.update_command(cid, "done")

    (cmd,) = store.commands(agent_id="a1")
    assert (cmd["id"], cmd["action"], cmd["args"]) == (cid, "kill", {"pid": 42})
    assert (cmd["state"], cmd["result"], cmd["expires"]) == (
        "succeeded",
        {"killed": True},
        T0,
    )
    assert cmd["updated"] >= cmd["created"]
    assert [c["id"] for c in store.commands(state="pending")] == ["cmd-2"]
    with pytest.raises(StorageError):
        await store.add_command("a3", "kill", command_id="cmd-2")  # id taken


async def test_store_plugin_state(store: Store) -> None:
    assert await store.get_state("dedup", "seen", default={}) == {}
    await store.put_state("dedup", "seen", {"k": [1, 2, "é"]})
    await store.put_state("dedup", "seen", {"k": [3]})
    await store.put_state("other", "seen", 5)
    await store.put_state("dedup", "none", None)

    assert await store.get_state("dedup", "seen") == {"k": [3]}
    assert await store.get_state("other", "seen") == 5
    assert await store.get_state("dedup", "none", default="absent") is None
    assert store.counts()["plugin_state"] == 3


async def test_store_as_async_context_manager(db_url: str) -> None:
    setup = Store(db_url)
    setup.upgrade()
    setup.close()

    async with Store(db_url) as store:
        await store.add_event(make_event())
    assert store.pending == 0
    reader = Store(db_url)
    try:
        assert reader.counts()["events"] == 1
    finally:
        reader.close()


def test_store_is_usable_before_an_event_loop(db_url: str) -> None:
    # The CLI reads without asyncio.
    store = Store(db_url)
    try:
        store.upgrade()
        assert store.events() == [] and store.agents() == []
    finally:
        store.close()


def test_store_refuses_in_memory_sqlite() -> None:
    with pytest.raises(StorageError, match="in-memory"):
        Store("sqlite://")
