"""Processes as targets: who may be acted on, killing, sockets, evidence.

Everything is read from ``/proc`` of the process itself, so that a process
in another network namespace shows its own sockets, not the agent's.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import struct
from typing import Any

import psutil

from immune.agent.actions.base import ActionError
from immune.agent.procfs import KTHREADD, parse_stat_start

#: ``PF_KTHREAD`` in the flags field (9) of ``/proc/<pid>/stat``.
PF_KTHREAD = 0x00200000
#: The most lines of ``maps``, open files, sockets or environment kept.
MAX_ITEMS = 4096


def _stat_fields(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ActionError(f"no process {pid}") from None
    # Fields after the command name, which may hold spaces and parentheses.
    return raw[raw.rfind(b")") + 2 :].decode().split()


def check_target(pid: int, start: int | None = None) -> None:
    """Refuse ``pid`` when acting on it would harm the host or the agent.

    Args:
        pid: the process.
        start: its start time (clock ticks since boot, as in events); when
            given and different, the pid was reused and the action refused.

    Raises:
        ActionError: pid 1 or lower, the agent itself, a kernel thread, a
            process that does not exist, or one that started at another time.
    """
    if pid <= 1:
        raise ActionError(f"pid {pid} refused: never act on init or the kernel")
    if pid == os.getpid() or os.path.exists(f"/proc/self/task/{pid}"):
        raise ActionError(f"pid {pid} refused: it is the agent itself")
    fields = _stat_fields(pid)
    if pid == KTHREADD or int(fields[1]) == KTHREADD or int(fields[6]) & PF_KTHREAD:
        raise ActionError(f"pid {pid} refused: it is a kernel thread")
    if start is not None:
        with open(f"/proc/{pid}/stat", "rb") as f:
            now = parse_stat_start(f.read())
        if now != start:
            msg = f"pid {pid} started at {now}, not {start}: the pid was reused"
            raise ActionError(msg)


def check_tree(pid: int) -> None:
    """Refuse to act on the tree of ``pid`` when the agent is part of it.

    Raises:
        ActionError: ``pid`` is an ancestor of the agent.
    """
    if pid in {p.pid for p in psutil.Process().parents()}:
        raise ActionError(f"pid {pid} refused: the agent is in its tree")


def descendants(pid: int) -> list[int]:
    """The pids of every descendant of ``pid`` (none if it is gone)."""
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_tree(pid: int) -> list[int]:
    """Stop ``pid`` and its descendants with SIGSTOP, so that none forks more.

    Returns:
        The pids stopped, ``pid`` first. Repeats until a pass finds no new
        descendant, so a child forked during the walk is caught too.
    """
    check_tree(pid)
    stopped: list[int] = []
    todo = [pid]
    for _ in range(16):
        for p in todo:
            if _signal(p, signal.SIGSTOP):
                stopped.append(p)
        todo = [p for p in descendants(pid) if p not in stopped]
        if not todo:
            break
    return stopped


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie counts: it runs no more)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def signal_all(pids: list[int], sig: int) -> list[int]:
    """Send ``sig`` to each of ``pids``; the ones that still existed."""
    return [p for p in pids if _signal(p, sig)]


# --------------------------------------------------------------------------
# Sockets, read from /proc/<pid>/net (the process's own network namespace)
# --------------------------------------------------------------------------

_TCP_STATES = {
    "01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
    "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
    "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING",
}  # fmt: skip


def socket_inodes(pid: int) -> set[int]:
    """The inode numbers of the sockets ``pid`` holds open."""
    inodes: set[int] = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _address(hexaddr: str) -> tuple[str, int]:
    addr, port = hexaddr.split(":")
    raw = bytes.fromhex(addr)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)
    # IPv6 is four little-endian 32-bit words.
    words = struct.unpack("<4I", raw)
    return socket.inet_ntop(socket.AF_INET6, struct.pack(">4I", *words)), int(port, 16)


def sockets(pid: int) -> list[dict[str, Any]]:
    """The TCP and UDP sockets of ``pid``: protocol, addresses, ports, state."""
    inodes = socket_inodes(pid)
    found: list[dict[str, Any]] = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/{pid}/net/{proto}", encoding="ascii") as f:
                lines = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            cols = line.split()
            if int(cols[9]) not in inodes:
                continue
            local, remote = _address(cols[1]), _address(cols[2])
            found.append(
                {
                    "protocol": proto.rstrip("6"),
                    "family": 6 if proto.endswith("6") else 4,
                    "local": list(local),
                    "remote": list(remote),
                    "state": _TCP_STATES.get(cols[3], cols[3])
                    if proto.startswith("tcp")
                    else None,
                    "inode": int(cols[9]),
                }
            )
    return found[:MAX_ITEMS]


# --------------------------------------------------------------------------
# Evidence
# --------------------------------------------------------------------------


def exe_sha256(pid: int) -> str | None:
    """The SHA-256 of the file ``pid`` runs, read through ``/proc/<pid>/exe``.

    That link opens the very file the process executes, even once it was
    deleted or replaced on disk.
    """
    digest = hashlib.sha256()
    try:
        with open(f"/proc/{pid}/exe", "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _maps(pid: int) -> list[dict[str, Any]]:
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="backslashreplace") as f:
        lines = f.read().splitlines()[:MAX_ITEMS]
    result = []
    for line in lines:
        cols = line.split(maxsplit=5)
        start, _, end = cols[0].partition("-")
        result.append(
            {
                "start": int(start, 16),
                "end": int(end, 16),
                "perms": cols[1],
                "offset": int(cols[2], 16),
                "inode": int(cols[4]),
                "path": cols[5] if len(cols) > 5 else None,
            }
        )
    return result


def _environ(proc: psutil.Process) -> dict[str, str]:
    env = proc.environ()
    return dict(list(env.items())[:MAX_ITEMS])


def collect(pid: int) -> dict[str, Any]:
    """Evidence of ``pid``: executable and its hash, command line,
    environment, identity, memory maps, open files and sockets.

    Raises:
        ActionError: the process does not exist or could not be read.
    """
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            info = proc.as_dict(
                ["name", "exe", "cmdline", "cwd", "ppid", "status", "create_time"]
            )
            uids, gids = proc.uids(), proc.gids()
            files = [{"path": f.path, "fd": f.fd} for f in proc.open_files()]
        evidence = {
            **info,
            "pid": pid,
            "uids": list(uids),
            "gids": list(gids),
            "environ": _environ(proc),
            "exe_sha256": exe_sha256(pid),
            "maps": _maps(pid),
            "open_files": files[:MAX_ITEMS],
            "sockets": sockets(pid),
        }
    except (psutil.NoSuchProcess, FileNotFoundError):
        raise ActionError(f"no process {pid}") from None
    except (psutil.AccessDenied, PermissionError) as exc:
        raise ActionError(f"cannot read process {pid}: {exc}") from exc
    return evidence
