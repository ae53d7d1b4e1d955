"""The quarantine vault: files moved out of reach, encrypted, restorable.

A quarantined file becomes two files in the vault directory (0700):
``<id>.bin``, its content encrypted with AES-256-GCM, and ``<id>.json``, what
is needed to put it back (original path, SHA-256, size, mode, owner, times).
The key is a random 256-bit key in a file of mode 0600 beside the vault.

The content is sealed in chunks of 1 MiB, so a large file never sits in
memory whole. Each chunk's nonce is a random 8-byte prefix of the file and
the chunk's number; its associated data binds the vault id, the number and
whether it is the last chunk, so chunks cannot be reordered, swapped
between files, or cut off without decryption failing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from immune.agent.actions.base import ActionError
from immune.events import new_id, now_ns
from immune.safe import printable

logger = logging.getLogger(__name__)

MAGIC = b"IMVAULT1"
CHUNK = 1 << 20


class Vault:
    """The encrypted vault in ``directory``, keyed by ``key_file``.

    Args:
        directory: where sealed files and their records go.
        key_file: the AES key; made (0600) on first use.
        max_file: the largest file accepted, in bytes.
    """

    def __init__(self, directory: Path, key_file: Path, max_file: int) -> None:
        self.directory = directory
        self.key_file = key_file
        self.max_file = max_file

    def _key(self) -> bytes:
        self.key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            key = self.key_file.read_bytes()
            if len(key) != 32:
                raise ActionError(
                    f"vault key {self.key_file} is not 32 bytes"
                ) from None
            return key
        key = AESGCM.generate_key(bit_length=256)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        logger.info("Made the vault key %s.", self.key_file)
        return key

    def quarantine(self, path: str) -> dict[str, Any]:
        """Seal the regular file ``path`` into the vault and remove it.

        Returns:
            The record: ``id``, ``path``, ``sha256``, ``size``, ``mode``,
            ``uid``, ``gid``.

        Raises:
            ActionError: not an absolute path, not a regular file (symbolic
                links are refused, not followed), inside the vault, too
                large, or unreadable.
        """
        if not os.path.isabs(path):
            raise ActionError(f"path {path!r} must be absolute")
        if Path(path).resolve().is_relative_to(self.directory.resolve()):
            raise ActionError(f"{path} is inside the vault")
        # O_NONBLOCK: opening a FIFO must not hang the agent; it is refused.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise ActionError(f"cannot open {path}: {exc.strerror}") from exc
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ActionError(f"{path} is not a regular file")
        with os.fdopen(fd, "rb") as src:
            if st.st_size > self.max_file:
                raise ActionError(f"{path} is larger than {self.max_file} bytes")
            record = self._seal(src, path, st)
        try:
            self._check(record)
            _remove_same(path, st)
        except ActionError:
            self._discard(record["id"])
            raise
        logger.info("Quarantined %s as %s.", printable(path), record["id"])
        return record

    def _seal(self, src: IO[bytes], path: str, st: os.stat_result) -> dict[str, Any]:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        item = new_id()
        sealed = self.directory / f"{item}.bin"
        try:
            digest, size = self._encrypt(src, sealed, item)
        except BaseException:
            sealed.unlink(missing_ok=True)
            raise
        record = {
            "id": item,
            "path": path,
            "sha256": digest,
            "size": size,
            "mode": stat.S_IMODE(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "mtime_ns": st.st_mtime_ns,
            # Other hard links still reach the content; the hive should know.
            "links": st.st_nlink,
            "quarantined_ns": now_ns(),
        }
        (self.directory / f"{item}.json").write_text(json.dumps(record))
        return record

    def _encrypt(self, src: IO[bytes], sealed: Path, item: str) -> tuple[str, int]:
        aead, prefix = AESGCM(self._key()), os.urandom(8)
        digest, size = hashlib.sha256(), 0
        with open(sealed, "xb") as out:
            out.write(MAGIC + prefix)
            for number, chunk, last in _chunks(src):
                digest.update(chunk)
                size += len(chunk)
                box = aead.encrypt(
                    _nonce(prefix, number), chunk, _aad(item, number, last)
                )
                out.write(struct.pack(">I", len(box)) + box)
            out.flush()
            os.fsync(out.fileno())
        return digest.hexdigest(), size

    def _discard(self, item: str) -> None:
        for suffix in (".bin", ".json"):
            (self.directory / f"{item}{suffix}").unlink(missing_ok=True)

    def _check(self, record: dict[str, Any]) -> None:
        # Read the sealed copy back before the original goes.
        digest = hashlib.sha256()
        for chunk in self._open(record["id"]):
            digest.update(chunk)
        if digest.hexdigest() != record["sha256"]:
            raise ActionError(f"vault copy of {record['path']} does not match")

    def _open(self, item: str) -> Iterator[bytes]:
        aead = AESGCM(self._key())
        try:
            f = open(self.directory / f"{item}.bin", "rb")
        except FileNotFoundError:
            raise ActionError(f"vault item {item} has lost its content") from None
        with f:
            head = f.read(len(MAGIC) + 8)
            if head[: len(MAGIC)] != MAGIC:
                raise ActionError(f"vault item {item} is not a sealed file")
            prefix, number = head[len(MAGIC) :], 0
            while raw := f.read(4):
                box = f.read(struct.unpack(">I", raw)[0])
                last = f.peek(1)[:1] == b""
                try:
                    yield aead.decrypt(
                        _nonce(prefix, number), box, _aad(item, number, last)
                    )
                except InvalidTag:
                    msg = f"vault item {item} is damaged or was tampered with"
                    raise ActionError(msg) from None
                number += 1

    def record(self, item: str) -> dict[str, Any]:
        """The record of vault item ``item``.

        Raises:
            ActionError: no such item.
        """
        try:
            data = (self.directory / f"{item}.json").read_text()
        except FileNotFoundError:
            raise ActionError(f"no vault item {item}") from None
        return dict(json.loads(data))

    def restore(self, item: str, overwrite: bool = False) -> dict[str, Any]:
        """Put vault item ``item`` back where it was, checked by its SHA-256.

        The content is written to a new file beside the original path, its
        hash checked, its mode, owner and modification time set, and only
        then renamed into place; the vault item is removed last.

        Raises:
            ActionError: no such item, something is at the path already (and
                not ``overwrite``), or the content does not match its hash.
        """
        record = self.record(item)
        path = Path(record["path"])
        if os.path.lexists(path) and not overwrite:
            msg = f"{path} exists; remove it or restore with overwrite"
            raise ActionError(msg)
        tmp = path.with_name(f".{path.name}.immune-restore-{item}")
        try:
            self._write(item, tmp, record)
            os.replace(tmp, path)
        except OSError as exc:
            msg = f"cannot restore {path}: {exc.strerror}; the vault keeps {item}"
            raise ActionError(msg) from exc
        finally:
            if tmp.exists():
                tmp.unlink()
        self._discard(item)
        logger.info("Restored %s from %s.", printable(path), item)
        return record

    def _write(self, item: str, tmp: Path, record: dict[str, Any]) -> None:
        digest = hashlib.sha256()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            for chunk in self._open(item):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != record["sha256"]:
            msg = f"vault item {item} does not match its SHA-256; not restored"
            raise ActionError(msg)
        os.chown(tmp, record["uid"], record["gid"])
        os.chmod(tmp, record["mode"])
        os.utime(tmp, ns=(record["mtime_ns"], record["mtime_ns"]))


def _remove_same(path: str, opened: os.stat_result) -> None:
    """Unlink ``path`` if it is still the file that was sealed.

    Raises:
        ActionError: something else is there now (it was swapped while it was
            read), or the unlink was refused (an immutable file, say).
    """
    try:
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
            raise ActionError(f"{path} was replaced while it was sealed; kept")
        os.unlink(path)
    except OSError as exc:
        raise ActionError(f"cannot remove {path}: {exc.strerror}") from exc


def _chunks(src: IO[bytes]) -> Iterator[tuple[int, bytes, bool]]:
    # Read one ahead to know which chunk is the last; an empty file is one
    # empty last chunk.
    number, chunk = 0, src.read(CHUNK)
    while True:
        following = src.read(CHUNK)
        yield number, chunk, not following
        if not following:
            return
        number, chunk = number + 1, following


def _nonce(prefix: bytes, number: int) -> bytes:
    return prefix + struct.pack(">I", number)


def _aad(item: str, number: int, last: bool) -> bytes:
    return item.encode() + struct.pack(">I?", number, last)
