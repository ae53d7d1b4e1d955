"""The event schema: validation, reasons, batches, encoding."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from immune.errors import EventError, PayloadTooLargeError
from immune.events import Event, decode_batch, encode, new_id, now_ns, parse_event


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
