"""Signed commands from the hive to agents, and the agents' acknowledgements.

A command travels as ``{"v": 1, "body": "<JSON>", "sig": "<base64>"}``: the
body is the command's JSON as a string, and the signature is Ed25519 over
the body's UTF-8 bytes, so the agent checks exactly the bytes the hive
signed. The hive's private key stays in a file of mode 0600; agents get the
public key (``immune pki command-key``). See docs/mqtt.md.
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from immune.errors import ConfigError, ImmuneError
from immune.events import Ident

COMMAND_VERSION = 1
Target = Annotated[
    str, msgspec.Meta(pattern=r"\A(\*|[A-Za-z0-9][A-Za-z0-9._:-]{0,127})\Z")
]
AckState = Literal["acknowledged", "succeeded", "failed", "refused"]
STATES = ("sent", "acknowledged", "succeeded", "failed", "timed_out", "refused")
#: States after which nothing more happens to a command.
FINAL_STATES = ("succeeded", "failed", "timed_out", "refused")


class CommandRefusedError(ImmuneError):
    """An agent refuses a command.

    Args:
        reason: why, for the hive's record.
        command_id: the command's id when it could be read, to acknowledge.
    """

    def __init__(self, reason: str, command_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.command_id = command_id


class Command(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What the hive asks of an agent (the signed body)."""

    v: int = COMMAND_VERSION
    id: Ident
    agent_id: Target
    action: Annotated[str, msgspec.Meta(pattern=r"\A[a-z][a-z0-9_]{0,63}\Z")]
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    issued_ns: int
    expires_ns: int


class Envelope(msgspec.Struct, kw_only=True):
    v: int = COMMAND_VERSION
    body: str
    sig: str


class Ack(msgspec.Struct, kw_only=True, omit_defaults=False):
    """An agent's answer to a command."""

    v: int = COMMAND_VERSION
    id: Ident
    agent_id: Ident
    state: AckState
    result: dict[str, Any] | None = None
    error: Annotated[str, msgspec.Meta(max_length=4096)] | None = None
    ts: int = 0


def load_or_create_key(path: str | Path) -> Ed25519PrivateKey:
    """The hive's signing key from ``path``, made (mode 0600) if missing.

    Raises:
        ConfigError: the file is readable by others, or is not an Ed25519
            private key in PEM.
    """
    path = Path(path)
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
        return key
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        msg = f"command key {path} is readable by others; chmod 600 {path}"
        raise ConfigError(msg)
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"command key {path} is not a PEM private key: {exc}"
        ) from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ConfigError(f"command key {path} is not an Ed25519 key")
    return loaded


def public_pem(key: Ed25519PrivateKey) -> bytes:
    """The public half of the hive's key, as PEM, for agents."""
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """The hive's public key, as agents read it.

    Raises:
        ConfigError: the file is missing or not an Ed25519 public key in PEM.
    """
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read the hive's public key {path}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 public key")
    return key


def sign(key: Ed25519PrivateKey, command: Command) -> bytes:
    """The MQTT payload carrying ``command``, signed."""
    body = msgspec.json.encode(command)
    sig = base64.b64encode(key.sign(body)).decode()
    return msgspec.json.encode(Envelope(body=body.decode(), sig=sig))


def verify(key: Ed25519PublicKey | None, payload: bytes) -> Command:
    """The command in ``payload`` if the hive's key signed it.

    Raises:
        CommandRefusedError: the payload is malformed, unsigned, or signed
            with another key (with the id when one could be read).
    """
    try:
        envelope = msgspec.json.decode(payload, type=Envelope)
        body = envelope.body.encode()
        command = msgspec.json.decode(body, type=Command)
    except msgspec.DecodeError as exc:
        raise CommandRefusedError(
            f"malformed command: {exc}", _id_of(payload)
        ) from None
    if key is None:
        msg = "no hive public key configured ([agent] command_public_key)"
        raise CommandRefusedError(msg, command.id)
    try:
        key.verify(base64.b64decode(envelope.sig, validate=True), body)
    except (InvalidSignature, ValueError):
        raise CommandRefusedError("bad signature", command.id) from None
    return command


def _id_of(payload: bytes) -> str | None:
    # Best effort, to acknowledge a refusal of something malformed.
    try:
        envelope = msgspec.json.decode(payload, type=dict[str, Any])
        body = msgspec.json.decode(str(envelope.get("body", "")), type=dict[str, Any])
        value = msgspec.convert(body.get("id"), Ident)
    except (msgspec.DecodeError, msgspec.ValidationError, TypeError):
        return None
    return str(value)
