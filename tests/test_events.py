"""The event schema: validation, reasons, batches, encoding."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from immune.errors import EventError, PayloadTooLargeError
from immune.events import (
    Event,
    decode_batch,
    decode_payload,
    encode,
    new_id,
    now_ns,
    parse_event,
)


def _event(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": new_id(),
        "agent_id": "host-1",
        "host": "host-1.example",
        "ts": now_ns(),
        "kind": "exec",
    }
    base.update(fields)
    return base


def test_events_ids_are_unique_and_time_ordered() -> None:
    ids = [new_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert ids == sorted(ids)


def test_events_minimal_event_is_valid_with_defaults() -> None:
    event = parse_event(_event())
    assert event.outcome == "allowed"
    assert event.severity == "info"
    assert event.topic == "event.exec"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"pid": "12"}, "Expected `int | null`, got `str` at $.pid"),
        ({"kind": "teleport"}, "at $.kind"),
        ({"port": 70000}, "at $.port"),
        ({"pid": -1}, "at $.pid"),
        ({"ts": 0}, "at $.ts"),
        ({"agent_id": "../../etc"}, "at $.agent_id"),
        ({"argv": "ls -l"}, "at $.argv"),
        ({"outcome": "maybe"}, "at $.outcome"),
        ({"comm": "x" * 300}, "at $.comm"),
    ],
)
def test_events_invalid_field_is_refused_with_its_path(
    fields: dict[str, object], reason: str
) -> None:
    with pytest.raises(EventError) as info:
        parse_event(_event(**fields))
    assert reason in info.value.reason


def test_events_missing_field_is_named() -> None:
    raw = _event()
    del raw["host"]
    with pytest.raises(EventError, match="missing required field `host`"):
        parse_event(raw)


def test_events_batch_keeps_good_events_and_reports_bad_ones() -> None:
    good = _event(pid=1)
    payload = orjson.dumps({"events": [good, _event(pid="x"), 7, _event(agent_id="b")]})
    events, rejected = decode_batch(payload, max_bytes=1 << 20, agent_id="host-1")
    assert [e.id for e in events] == [good["id"]]
    assert [r.index for r in rejected] == [1, 2, 3]
    assert "$.events[1].pid" in rejected[0].reason
    assert "Expected `object`, got `int` at $.events[2]" == rejected[1].reason
    assert "claims agent 'b'" in rejected[2].reason


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", "x\n"),
        ("id", ""),
        ("id", "-starts-with-a-dash"),
        ("id", "a" * 129),
        ("agent_id", "web-1\n"),
        ("agent_id", "web 1"),
        ("agent_id", "../../etc"),
    ],
)
def test_events_bad_identifier_is_refused_alone_in_a_batch(
    field: str, value: str
) -> None:
    # Identifiers are checked for the whole batch at once; a bad one sends the
    # batch event by event, which names it and keeps the others.
    first, last = _event(), _event()
    bad = _event(**{field: value})
    payload = orjson.dumps({"events": [first, bad, last]})
    decoded = decode_payload(payload, max_bytes=1 << 20)
    assert [e.id for e in decoded.events] == [first["id"], last["id"]]
    (rejected,) = decoded.rejected
    assert rejected.index == 1
    assert f"{field} must be 1 to 128 letters" in rejected.reason
    assert rejected.reason.endswith(f"at $.events[1].{field}")
    assert "\n" not in rejected.reason  # shown escaped, never a second log line
    with pytest.raises(EventError, match=f"at \\$.{field}"):
        parse_event(bad)


def test_events_good_identifiers_pass_the_batch_check() -> None:
    odd = ["A", "0", "a" * 128, "x.y_z:1-2", "Z" * 64]
    events = [_event(id=i) for i in odd]
    decoded = decode_payload(orjson.dumps({"events": events}), max_bytes=1 << 20)
    assert [e.id for e in decoded.events] == odd
    assert decoded.rejected == []


def test_events_envelope_carries_its_spool_range() -> None:
    payload = orjson.dumps(
        {"v": 1, "agent_id": "host-1", "seq": [3, 4], "events": [_event(), _event()]}
    )
    decoded = decode_payload(payload, max_bytes=1 << 20, agent_id="host-1")
    assert len(decoded.events) == 2
    assert decoded.seq == (3, 4)
    # A bad event does not lose the range: the batch is still receipted.
    payload = orjson.dumps({"seq": [5, 6], "events": [_event(), _event(pid="x")]})
    decoded = decode_payload(payload, max_bytes=1 << 20, agent_id="host-1")
    assert (len(decoded.events), len(decoded.rejected), decoded.seq) == (1, 1, (5, 6))
    # A range that is not one is ignored: the events count, no receipt.
    payload = orjson.dumps({"seq": "five", "events": [_event()]})
    decoded = decode_payload(payload, max_bytes=1 << 20)
    assert (len(decoded.events), decoded.seq) == (1, None)


@pytest.mark.parametrize(
    ("envelope", "reason"),
    [
        ({"v": 2}, "batch of schema version 2 at $.v: this hive reads version 1"),
        ({"v": "1"}, "batch of schema version '1' at $.v"),
        ({"agent_id": "other"}, "batch claims agent 'other' at $.agent_id"),
        ({"agent_id": "bad id"}, "the batch's agent_id is not a valid agent id"),
    ],
)
def test_events_envelope_of_another_version_or_agent_is_refused_whole(
    envelope: dict[str, object], reason: str
) -> None:
    payload = orjson.dumps({**envelope, "events": [_event()]})
    with pytest.raises(EventError) as info:
        decode_payload(payload, max_bytes=1 << 20, agent_id="host-1")
    assert reason in info.value.reason


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"events": {"a": 1}}', "`events` must be a JSON array"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_events_unusable_payload_is_refused_whole(payload: bytes, reason: str) -> None:
    with pytest.raises(EventError, match=reason):
        decode_batch(payload, max_bytes=1 << 20)


def test_events_oversized_payload_is_refused_before_parsing() -> None:
    payload = orjson.dumps({"events": [_event(argv=["x" * 4000])] * 10})
    with pytest.raises(PayloadTooLargeError, match=f"{len(payload)} bytes exceeds"):
        decode_batch(payload, max_bytes=1000)


def test_events_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    event = parse_event(_event(future_field={"x": 1}))
    assert not hasattr(event, "future_field")


text = st.text(max_size=50)
events = st.builds(
    Event,
    id=st.just("01-x"),
    agent_id=st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,20}\Z"),
    host=text,
    ts=st.integers(1, 2**63 - 1),
    kind=st.sampled_from(["exec", "fork", "connect", "setuid"]),
    pid=st.none() | st.integers(0, 2**31 - 1),
    argv=st.none() | st.lists(text, max_size=5),
    port=st.none() | st.integers(0, 65535),
    extra=st.none()
    | st.dictionaries(
        text, st.integers(-(2**63), 2**63 - 1) | text | st.none(), max_size=3
    ),
)


def test_events_extra_integer_beyond_64_bits_is_refused_with_its_field() -> None:
    # orjson refuses to write such a number; an agent in another language may.
    payload = json.dumps({"events": [_event(extra={"big": 2**64})]}).encode()
    good, bad = decode_batch(payload, max_bytes=1 << 20)
    assert good == []
    assert (
        len(bad) == 1 and "<= 9223372036854775807 at $.events[0].extra" in bad[0].reason
    )


@given(events)
def test_events_encode_then_decode_round_trips(event: Event) -> None:
    decoded, rejected = decode_batch(encode({"events": [event]}), max_bytes=1 << 20)
    assert rejected == []
    assert decoded == [event]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(list(_event())) | st.text(), json_values))
def test_events_arbitrary_json_is_accepted_or_refused_with_a_reason(raw: dict) -> None:
    payload = orjson.dumps({"events": [raw]}, option=orjson.OPT_NON_STR_KEYS)
    events, rejected = decode_batch(payload, max_bytes=1 << 20)
    assert len(events) + len(rejected) == 1
    for r in rejected:
        assert r.reason


@given(st.binary(max_size=200))
def test_events_arbitrary_bytes_never_crash_the_decoder(payload: bytes) -> None:
    try:
        decode_batch(payload, max_bytes=1 << 20)
    except EventError as exc:
        assert exc.reason


def test_events_integer_beyond_64_bits_is_refused_with_a_reason() -> None:
    raw = orjson.dumps({"events": [_event()]}).replace(
        b'"kind"', b'"pid":1' + b"9" * 30 + b',"kind"'
    )
    events, rejected = decode_batch(raw, max_bytes=1000)
    assert events == []
    assert rejected[0].reason == "Expected `int` <= 2147483647 at $.events[0].pid"
