"""The event model: what agents report and what the hive concludes.

One versioned schema (``v``) covers every host event. Payloads arrive as JSON,
are decoded with orjson and validated field by field with msgspec, so a bad
event is refused with a reason that names the field at fault. See
``docs/events.md`` for the schema and its ECS equivalents.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

import msgspec
import orjson
import uuid6

from immune.errors import EventError, PayloadTooLargeError
from immune.safe import printable

SCHEMA_VERSION = 1

#: Process and network activity an agent reports, plus its own lifecycle.
HOST_KINDS = ("exec", "fork", "exit", "connect", "bind", "open", "setuid")
AGENT_KINDS = ("agent_start", "agent_stop", "sensor_error")
KINDS = HOST_KINDS + AGENT_KINDS
#: The bus topic of each kind (``event.<kind>``), looked up once per event.
EVENT_TOPICS = {kind: f"event.{kind}" for kind in KINDS}
SEVERITIES = ("info", "low", "medium", "high", "critical")
SEVERITY_RANK = {name: rank for rank, name in enumerate(SEVERITIES)}

Kind = Literal[
    "exec",
    "fork",
    "exit",
    "connect",
    "bind",
    "open",
    "setuid",
    "agent_start",
    "agent_stop",
    "sensor_error",
]
Severity = Literal["info", "low", "medium", "high", "critical"]
Outcome = Literal["allowed", "blocked", "unknown"]
Family = Literal["inet", "inet6", "unix"]

# Identifiers travel in MQTT topics and file names: keep them to a safe set.
# The pattern as JSON Schema (and RE2) read it; Python's `$` would also match
# before a final newline, so Python checks use IDENT_RE.fullmatch or \Z.
IDENT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
IDENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
Ident = Annotated[
    str,
    msgspec.Meta(
        pattern=r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z",
        extra_json_schema={"pattern": IDENT_PATTERN},
    ),
]
# An event's identifiers follow the same pattern, but it is checked for a
# whole batch at once (check_idents), not by msgspec field by field: a
# regular expression call per field cost a quarter of decoding an event.
EventIdent = Annotated[str, msgspec.Meta(extra_json_schema={"pattern": IDENT_PATTERN})]
Text = Annotated[str, msgspec.Meta(max_length=4096)]
ShortText = Annotated[str, msgspec.Meta(max_length=256)]
Id32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
Pid = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
TimestampNs = Annotated[int, msgspec.Meta(gt=0, le=2**63 - 1)]
# Any other integer: what a database column and every encoder take.
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
Argv = Annotated[list[Text], msgspec.Meta(max_length=1024)]
Extra = Annotated[
    dict[ShortText, Text | Int64 | float | bool | None], msgspec.Meta(max_length=64)
]


class Event(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """One thing that happened on a host.

    Only ``id``, ``agent_id``, ``host``, ``ts`` and ``kind`` are required; the
    rest is filled in where the sensor knows it. Unknown fields are ignored,
    so newer agents can talk to older hives; put sensor-specific data in
    ``extra``. Events hold no reference cycles, so the garbage collector is
    told not to track them (``gc=False``): at tens of thousands a second,
    tracking them would make collections frequent and slow.
    """

    id: EventIdent
    agent_id: EventIdent
    host: ShortText
    ts: TimestampNs
    kind: Kind
    v: Annotated[int, msgspec.Meta(ge=1, le=SCHEMA_VERSION)] = SCHEMA_VERSION
    pid: Pid | None = None
    ppid: Pid | None = None
    uid: Id32 | None = None
    euid: Id32 | None = None
    old_euid: Id32 | None = None
    comm: ShortText | None = None
    exe: Text | None = None
    argv: Argv | None = None
    cwd: Text | None = None
    path: Text | None = None
    addr: ShortText | None = None
    port: Port | None = None
    family: Family | None = None
    exit_code: Int64 | None = None
    outcome: Outcome = "allowed"
    severity: Severity = "info"
    sensor: ShortText = "unknown"
    extra: Extra | None = None

    @property
    def topic(self) -> str:
        """The bus topic this event is published on."""
        return f"event.{self.kind}"

    @property
    def cmdline(self) -> str:
        """The command line as one string (argv joined), or the executable."""
        if self.argv:
            return " ".join(self.argv)
        return self.exe or ""


class Alert(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A conclusion a detection drew from one or more events."""

    id: str
    ts: int
    rule: ShortText
    title: Text
    severity: Severity
    plugin: ShortText
    agent_id: str | None = None
    host: str | None = None
    event_ids: list[str] = msgspec.field(default_factory=list)
    techniques: list[str] = msgspec.field(default_factory=list)
    description: Text = ""
    count: int = 1
    data: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def topic(self) -> str:
        return f"alert.{self.severity}"


# A spool position: what a receipt sends back must fit JSON encoders (64 bits).
SeqNumber = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
Seq = tuple[SeqNumber, SeqNumber]


class Envelope(msgspec.Struct, kw_only=True):
    """The envelope an agent publishes: many events in one MQTT message.

    ``seq`` is the range of the agent's spool the batch holds, sent back in a
    receipt once the batch is stored; ``v`` and ``agent_id`` must agree with
    the schema version and the topic.
    """

    events: list[Event]
    v: int = SCHEMA_VERSION
    agent_id: str | None = None
    seq: Seq | None = None


class Decoded(msgspec.Struct):
    """What :func:`decode_payload` made of a payload."""

    events: list[Event]
    rejected: list[Rejected]
    #: The spool range to receipt, when the envelope carried a valid one.
    seq: Seq | None = None


class Rejected(msgspec.Struct, kw_only=True):
    """One event of a batch that failed validation, with its JSON as received."""

    index: int | None
    reason: str
    raw: bytes = b""


def new_id() -> str:
    """A unique, time-ordered identifier (UUIDv7, 36 characters)."""
    return str(uuid6.uuid7())


def now_ns() -> int:
    return time.time_ns()


def _reason(exc: msgspec.ValidationError, prefix: str) -> tuple[str, str | None]:
    # msgspec says "Expected `int`, got `str` - at `$.pid`"; point at the
    # field inside the batch rather than inside the lone event.
    text, _, where = str(exc).partition(" - at `$")
    field = prefix + where.rstrip("`")
    return f"{text} at {field}", field


def parse_event(obj: Any, *, prefix: str = "$") -> Event:
    """Validate one decoded JSON object as an :class:`Event`.

    Raises:
        EventError: naming the field at fault.
    """
    if not isinstance(obj, dict):
        msg = f"an event must be a JSON object, got {type(obj).__name__} at {prefix}"
        raise EventError(msg, prefix)
    try:
        event = msgspec.convert(obj, Event)
    except msgspec.ValidationError as exc:
        reason, field = _reason(exc, prefix)
        raise EventError(reason, field) from None
    check_idents(event, prefix)
    return event


def check_idents(event: Event, prefix: str = "$") -> None:
    """Check an event's ``id`` and ``agent_id`` against :data:`IDENT_PATTERN`.

    Raises:
        EventError: naming the field at fault.
    """
    for name in ("id", "agent_id"):
        value = getattr(event, name)
        if IDENT_RE.fullmatch(value) is None:
            field = f"{prefix}.{name}"
            msg = (
                f"{name} must be 1 to 128 letters, digits, '.', '_', ':' or '-', "
                f"starting with a letter or digit; got '{printable(value, 140)}' "
                f"at {field}"
            )
            raise EventError(msg, field)


def _idents_ok(events: list[Event]) -> bool:
    # Every id and agent id of a batch checked with two calls in C, rather
    # than a regular expression call per field (see EventIdent).
    ids = "\n".join([event.id for event in events])
    if ids.count("\n") != len(events) - 1 or _IDENT_LINES.fullmatch(ids) is None:
        return False
    agents = {event.agent_id for event in events}
    return all(IDENT_RE.fullmatch(agent) is not None for agent in agents)


def decode_batch(
    payload: bytes, *, max_bytes: int, agent_id: str | None = None
) -> tuple[list[Event], list[Rejected]]:
    """Decode an MQTT payload holding one event or a batch of events.

    The good events and the rejected ones; see :func:`decode_payload`.
    """
    decoded = decode_payload(payload, max_bytes=max_bytes, agent_id=agent_id)
    return decoded.events, decoded.rejected


def decode_payload(
    payload: bytes, *, max_bytes: int, agent_id: str | None = None
) -> Decoded:
    """Decode an MQTT payload holding one event or a batch of events.

    A payload is either ``{"events": [...]}`` (an :class:`Envelope`) or a
    single event object. Each event of a batch is validated on its own: the
    good ones are returned, the bad ones come back as :class:`Rejected` with
    their reason.

    Args:
        payload: the raw bytes.
        max_bytes: the largest payload accepted; larger ones are refused whole.
        agent_id: when given, events (and an envelope) claiming another agent
            are rejected (the topic names the agent that sent them).

    Raises:
        EventError: the payload as a whole is unusable (too large, not JSON,
            not an object, an envelope of another version or agent).
    """
    if len(payload) > max_bytes:
        msg = f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}"
        raise PayloadTooLargeError(msg)
    # The usual batch is all good: decode it in one pass, and go event by
    # event only to find out which ones are bad.
    try:
        batch = _envelope_decoder.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        pass  # not a batch, or a bad part in it (invalid UTF-8, too deep...)
    else:
        _check_envelope(batch.v, batch.agent_id, agent_id)
        events = batch.events
        if (agent_id is None or all(e.agent_id == agent_id for e in events)) and (
            not events or _idents_ok(events)
        ):
            return Decoded(events, [], batch.seq)
    return _decode_slowly(payload, agent_id)


def _check_envelope(version: Any, claimed: Any, agent_id: str | None) -> None:
    # `true` and `1.0` equal 1 to Python: the version must be the integer.
    if type(version) is not int or version != SCHEMA_VERSION:
        msg = (
            f"batch of schema version {printable(repr(version), 20)} at $.v: "
            f"this hive reads version {SCHEMA_VERSION}"
        )
        raise EventError(msg, "$.v")
    if claimed is None:
        return
    if not isinstance(claimed, str) or IDENT_RE.fullmatch(claimed) is None:
        raise EventError("the batch's agent_id is not a valid agent id", "$.agent_id")
    if agent_id is not None and claimed != agent_id:
        msg = (
            f"batch claims agent {claimed!r} at $.agent_id but was published "
            f"on the topic of agent {agent_id!r}"
        )
        raise EventError(msg, "$.agent_id")


def _decode_slowly(payload: bytes, agent_id: str | None) -> Decoded:
    # Decode the envelope only, keeping each event as raw JSON; then each
    # event on its own, to name the bad ones.
    try:
        top = _top_decoder.decode(payload)
    except msgspec.ValidationError:
        raise EventError(_not_an_object(payload)) from None
    except msgspec.DecodeError as exc:
        raise EventError(f"payload is not valid JSON: {exc}") from None
    except RecursionError:
        raise EventError(_TOO_DEEP.format(where="payload")) from None

    seq = None
    if "events" not in top:
        items, prefix = [msgspec.Raw(payload)], "$"
    else:
        version, claimed, seq = _envelope_fields(top)
        _check_envelope(version, claimed, agent_id)
        try:
            items = _list_decoder.decode(top["events"])
        except msgspec.DecodeError:
            raise EventError("`events` must be a JSON array", "$.events") from None
        except RecursionError:
            raise EventError(_TOO_DEEP.format(where="$.events"), "$.events") from None
        prefix = "$.events[{}]"

    good: list[Event] = []
    bad: list[Rejected] = []
    for index, item in enumerate(items):
        where = prefix.format(index)
        try:
            event = _event_decoder.decode(item)
            check_idents(event, where)
        except msgspec.ValidationError as exc:
            reason, _field = _reason(exc, where)
            bad.append(Rejected(index=index, reason=reason, raw=bytes(item)))
            continue
        except EventError as exc:
            bad.append(Rejected(index=index, reason=exc.reason, raw=bytes(item)))
            continue
        except msgspec.DecodeError as exc:
            # Well-formed JSON around the event, but not inside it (a string
            # that is not UTF-8): refuse this event, not the whole batch.
            reason = f"event at {where} is not valid JSON: {exc}"
            bad.append(Rejected(index=index, reason=reason, raw=bytes(item)))
            continue
        except RecursionError:
            reason = _TOO_DEEP.format(where=f"event at {where}")
            bad.append(Rejected(index=index, reason=reason, raw=bytes(item)))
            continue
        if agent_id is not None and event.agent_id != agent_id:
            reason = (
                f"event at {where} claims agent {event.agent_id!r} "
                f"but was published on the topic of agent {agent_id!r}"
            )
            bad.append(Rejected(index=index, reason=reason, raw=bytes(item)))
            continue
        good.append(event)
    return Decoded(good, bad, seq)


def _envelope_fields(top: dict[str, msgspec.Raw]) -> tuple[Any, Any, Seq | None]:
    """The envelope's ``v`` and ``agent_id`` as sent, and ``seq`` if valid."""
    values = []
    for name, default in (("v", SCHEMA_VERSION), ("agent_id", None)):
        raw = top.get(name)
        try:
            values.append(default if raw is None else _any_decoder.decode(raw))
        except (msgspec.DecodeError, RecursionError):
            values.append(f"<invalid {name}>")
    seq = None
    if "seq" in top:
        try:
            seq = _seq_decoder.decode(top["seq"])
        except (msgspec.DecodeError, RecursionError):
            seq = None  # the events still count; only the receipt is lost
    return values[0], values[1], seq


_TOO_DEEP = "{where} is nested too deeply to decode"
_top_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
_list_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_event_decoder = msgspec.json.Decoder(Event)
_envelope_decoder = msgspec.json.Decoder(Envelope)
_seq_decoder = msgspec.json.Decoder(Seq | None)
_any_decoder = msgspec.json.Decoder()
_IDENT_LINES = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}(?:\n[A-Za-z0-9][A-Za-z0-9._:-]{0,127})*"
)


def _not_an_object(payload: bytes) -> str:
    try:
        kind = type(orjson.loads(payload)).__name__
    except orjson.JSONDecodeError as exc:
        return f"payload is not valid JSON: {exc}"
    return f"payload must be a JSON object, got {kind}"


def encode(obj: msgspec.Struct | dict[str, Any] | list[Any]) -> bytes:
    """Encode an event, an alert or a batch (of either) as compact JSON."""
    return orjson.dumps(obj, default=msgspec.to_builtins)


def to_dict(obj: msgspec.Struct) -> dict[str, Any]:
    """A plain dict of a struct, without the fields left at their default."""
    result: dict[str, Any] = msgspec.to_builtins(obj)
    return result
