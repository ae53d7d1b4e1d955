"""The one-pass batch decode agrees with decoding each event alone."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from immune.errors import EventError
from immune.events import IDENT_RE, decode_payload, new_id, now_ns, parse_event

_ALPHABET = "aZ09._:-\n\r \t\u0660\uff21\u00e9\u212a/\x00"
_IDENT = st.one_of(
    st.text(alphabet=_ALPHABET, max_size=6),
    st.sampled_from(["", "a" * 128, "a" * 129, "a\nb", "a\n", "\na", "a\r", "٣", "Ａ"]),
    st.builds(lambda n: "b" * n, st.integers(125, 131)),
)


def _event(ident: str, agent: str) -> dict[str, object]:
    return {"id": ident, "agent_id": agent, "host": "h", "ts": now_ns(), "kind": "exec"}


def _reference(
    events: list[dict[str, object]], agent_id: str | None
) -> tuple[list, list]:
    good, bad = [], []
    for index, raw in enumerate(events):
        try:
            event = parse_event(orjson.loads(orjson.dumps(raw)))
        except EventError:
            bad.append(index)
            continue
        if agent_id is not None and event.agent_id != agent_id:
            bad.append(index)
            continue
        good.append(event)
    return good, bad


@settings(max_examples=600, deadline=None)
@given(
    st.lists(st.tuples(_IDENT, _IDENT), max_size=5),
    st.sampled_from([None, "a", "host-1"]),
)
def test_batch_decode_agrees_with_event_by_event(
    idents: list[tuple[str, str]], agent_id: str | None
) -> None:
    events = [_event(i, a) for i, a in idents]
    decoded = decode_payload(
        orjson.dumps({"events": events}), max_bytes=1 << 20, agent_id=agent_id
    )
    good, bad = _reference(events, agent_id)
    assert decoded.events == good
    assert [r.index for r in decoded.rejected] == bad
    for event in decoded.events:
        assert IDENT_RE.fullmatch(event.id) and IDENT_RE.fullmatch(event.agent_id)


@settings(max_examples=300, deadline=None)
@given(_IDENT, _IDENT)
def test_single_event_payload_agrees_with_parse_event(ident: str, agent: str) -> None:
    raw = _event(ident, agent)
    try:
        expected = [parse_event(raw)]
    except EventError:
        expected = []
    decoded = decode_payload(orjson.dumps(raw), max_bytes=1 << 20)
    assert decoded.events == expected
    assert len(decoded.rejected) == 1 - len(expected)


@pytest.mark.parametrize(
    ("seq", "expected"),
    [
        (b"[1,2]", (1, 2)),
        (b'"x"', None),
        (b"[-1,2]", None),
        (b"[0,1]", None),
        (b"[1,2,3]", None),
        (b"[1]", None),
        (b"[1.0,2]", None),
        (b"[true,2]", None),
        (b"null", None),
    ],
)
def test_bad_seq_never_loses_the_events(seq: bytes, expected: object) -> None:
    events = orjson.dumps([_event(new_id(), "host-1"), _event(new_id(), "host-1")])
    payload = b'{"seq":' + seq + b',"events":' + events + b"}"
    decoded = decode_payload(payload, max_bytes=1 << 20, agent_id="host-1")
    assert len(decoded.events) == 2
    assert decoded.seq == expected


def test_empty_batch_is_empty() -> None:
    decoded = decode_payload(b'{"events": []}', max_bytes=1 << 20, agent_id="a")
    assert (decoded.events, decoded.rejected, decoded.seq) == ([], [], None)


@pytest.mark.parametrize("version", ["true", "1.0", "1e0", '"1"'])
def test_envelope_version_must_be_the_integer_1(version: str) -> None:
    events = orjson.dumps([_event(new_id(), "host-1")])
    payload = b'{"v": ' + version.encode() + b', "events": ' + events + b"}"
    with pytest.raises(EventError, match=r"\$\.v"):
        decode_payload(payload, max_bytes=1 << 20, agent_id="host-1")


def test_seq_beyond_64_bits_is_not_kept_for_a_receipt() -> None:
    # A receipt could not encode it back (see transport/test_receipts_hostile.py).
    events = orjson.dumps([_event(new_id(), "host-1")])
    payload = b'{"seq":[18446744073709551616,18446744073709551617],"events":'
    decoded = decode_payload(payload + events + b"}", max_bytes=1 << 20)
    assert len(decoded.events) == 1
    assert decoded.seq is None
