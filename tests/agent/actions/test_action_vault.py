"""quarantine and restore: a file the test wrote, sealed and put back intact."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from immune.agent.actions import ACTIONS, ActionError, Responder

pytestmark = pytest.mark.usefixtures("as_root")

NOBODY = 65534


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o640)
    os.chown(path, NOBODY, NOBODY)
    os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))


@pytest.mark.parametrize(
    "size", [0, 10, 3 * (1 << 20) + 17], ids=["empty", "small", "3MiB"]
)
async def test_quarantine_and_restore(
    responder: Responder, tmp_path: Path, size: int
) -> None:
    victim = tmp_path / "payload.elf"
    data = os.urandom(size)
    _write(victim, data)
    before = victim.stat()

    record = await ACTIONS["quarantine"]({"path": str(victim)})
    assert not victim.exists()
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert (record["path"], record["size"], record["mode"]) == (
        str(victim),
        size,
        0o640,
    )
    assert (record["uid"], record["gid"]) == (NOBODY, NOBODY)
    vault = responder.vault.directory
    sealed = (vault / f"{record['id']}.bin").read_bytes()
    assert data[:64] not in sealed or size == 0
    assert stat.S_IMODE(responder.vault.key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(vault.stat().st_mode) == 0o700

    result = await ACTIONS["restore"]({"id": record["id"]})
    assert result["sha256"] == record["sha256"]
    assert victim.read_bytes() == data
    after = victim.stat()
    assert stat.S_IMODE(after.st_mode) == 0o640
    assert (after.st_uid, after.st_gid) == (NOBODY, NOBODY)
    assert after.st_mtime_ns == before.st_mtime_ns
    assert list(vault.iterdir()) == []


async def test_restore_refuses_a_tampered_item(
    responder: Responder, tmp_path: Path
) -> None:
    victim = tmp_path / "f"
    _write(victim, b"evil" * 1000)
    record = await ACTIONS["quarantine"]({"path": str(victim)})
    sealed = responder.vault.directory / f"{record['id']}.bin"
    raw = bytearray(sealed.read_bytes())
    raw[40] ^= 1
    sealed.write_bytes(bytes(raw))
    with pytest.raises(ActionError, match="tampered"):
        await ACTIONS["restore"]({"id": record["id"]})
    assert not victim.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "state"] == []
    assert sealed.exists()


async def test_restore_refuses_a_truncated_item(
    responder: Responder, tmp_path: Path
) -> None:
    from immune.agent.actions.vault import CHUNK

    victim = tmp_path / "f"
    _write(victim, os.urandom(2 * CHUNK + 5))
    record = await ACTIONS["quarantine"]({"path": str(victim)})
    sealed = responder.vault.directory / f"{record['id']}.bin"
    raw = sealed.read_bytes()
    sealed.write_bytes(raw[: 16 + 2 * (4 + CHUNK + 16)])  # the last chunk cut off
    with pytest.raises(ActionError, match="tampered"):
        await ACTIONS["restore"]({"id": record["id"]})
    assert not victim.exists()


async def test_restore_will_not_overwrite(responder: Responder, tmp_path: Path) -> None:
    victim = tmp_path / "f"
    _write(victim, b"first")
    record = await ACTIONS["quarantine"]({"path": str(victim)})
    victim.write_bytes(b"second")
    with pytest.raises(ActionError, match="exists"):
        await ACTIONS["restore"]({"id": record["id"]})
    assert victim.read_bytes() == b"second"
    await ACTIONS["restore"]({"id": record["id"], "overwrite": True})
    assert victim.read_bytes() == b"first"


async def test_quarantine_refuses_what_is_not_a_file(
    responder: Responder, tmp_path: Path
) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"keep me")
    link = tmp_path / "link"
    link.symlink_to(target)
    cases = {
        str(link): "cannot open",
        str(tmp_path): "not a regular file",
        "relative/path": "absolute",
        str(tmp_path / "missing"): "cannot open",
    }
    for path, words in cases.items():
        with pytest.raises(ActionError, match=words):
            await ACTIONS["quarantine"]({"path": path})
    assert target.read_bytes() == b"keep me"
    assert link.is_symlink()


async def test_restore_of_an_unknown_item(responder: Responder) -> None:
    with pytest.raises(ActionError, match="no vault item"):
        await ACTIONS["restore"]({"id": "0" * 8 + "-0000-0000-0000-" + "0" * 12})


async def test_restore_into_a_missing_directory(
    responder: Responder, tmp_path: Path
) -> None:
    folder = tmp_path / "gone"
    folder.mkdir()
    victim = folder / "f"
    _write(victim, b"content")
    record = await ACTIONS["quarantine"]({"path": str(victim)})
    folder.rmdir()
    with pytest.raises(ActionError, match="the vault keeps"):
        await ACTIONS["restore"]({"id": record["id"]})
    folder.mkdir()
    await ACTIONS["restore"]({"id": record["id"]})
    assert victim.read_bytes() == b"content"


async def test_quarantine_counts_other_hard_links(
    responder: Responder, tmp_path: Path
) -> None:
    victim = tmp_path / "f"
    _write(victim, b"linked")
    os.link(victim, tmp_path / "other-name")
    record = await ACTIONS["quarantine"]({"path": str(victim)})
    assert record["links"] == 2
    assert not victim.exists()


async def test_restore_of_an_item_without_content(
    responder: Responder, tmp_path: Path
) -> None:
    victim = tmp_path / "f"
    _write(victim, b"x")
    record = await ACTIONS["quarantine"]({"path": str(victim)})
    (responder.vault.directory / f"{record['id']}.bin").unlink()
    with pytest.raises(ActionError, match="lost its content"):
        await ACTIONS["restore"]({"id": record["id"]})
    assert not victim.exists()


def test_a_file_swapped_while_sealed_is_kept(tmp_path: Path) -> None:
    from immune.agent.actions.vault import _remove_same

    victim = tmp_path / "f"
    victim.write_bytes(b"sealed")
    sealed = victim.stat()
    swapped = tmp_path / "swap"
    swapped.write_bytes(b"innocent")
    os.replace(swapped, victim)
    with pytest.raises(ActionError, match="replaced"):
        _remove_same(str(victim), sealed)
    assert victim.read_bytes() == b"innocent"
