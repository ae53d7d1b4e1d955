"""The response actions themselves, as methods of one :class:`Responder`.

Each method takes the command's ``args`` dict, checks it against a
:class:`msgspec.Struct`, does the work (blocking parts on a worker thread)
and returns a result dict for the hive. Undo actions are the mirror of
their action: ``thaw`` of ``freeze``, ``release`` of ``jail``,
``unisolate`` of ``isolate``, ``unblock`` of ``block``, ``restore`` of
``quarantine``. A ``duration`` makes an action undo itself: blocks expire in
the kernel (nft set timeouts), isolation and jails by a timer of the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from immune.agent.actions import nft, procs
from immune.agent.actions.base import MAX_DURATION, ActionError, Settings, parse
from immune.agent.actions.cgroups import Cgroups
from immune.agent.actions.vault import Vault
from immune.errors import ImmuneError
from immune.events import now_ns
from immune.metrics import Metrics
from immune.safe import printable

logger = logging.getLogger(__name__)

Pid = Annotated[int, msgspec.Meta(ge=1, le=2**22)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Duration = Annotated[int, msgspec.Meta(ge=1, le=MAX_DURATION)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]
#: The depth of ``<prefix>/jail-<pid>`` below the cgroup v2 root.
JAIL_LEVEL = 2
PolicyHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]] | dict[str, Any]]


class _Args(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class PingArgs(_Args):
    echo: Annotated[str, msgspec.Meta(max_length=256)] | None = None


class KillArgs(_Args):
    pid: Pid
    tree: bool = False
    signal: Literal["KILL", "TERM"] = "KILL"
    #: Start time (clock ticks since boot, as events carry); guards pid reuse.
    start: int | None = None
    wait: Annotated[float, msgspec.Meta(ge=0, le=30)] = 5.0


class FreezeArgs(_Args):
    pid: Pid
    tree: bool = False
    start: int | None = None


class JailArgs(FreezeArgs):
    freeze: bool = False
    duration: Duration | None = None


class PidArgs(_Args):
    pid: Pid


class Endpoint(_Args):
    address: Text
    port: Port | None = None
    protocol: Literal["tcp", "udp"] = "tcp"


class IsolateArgs(_Args):
    allow: Annotated[list[Endpoint], msgspec.Meta(max_length=64)] = []
    duration: Duration | None = None


class BlockArgs(_Args):
    address: Text | None = None
    port: Port | None = None
    duration: Duration | None = None


class PathArgs(_Args):
    path: Text


class RestoreArgs(_Args):
    id: Annotated[str, msgspec.Meta(pattern=r"\A[0-9a-f-]{36}\Z")]
    overwrite: bool = False


class Responder:
    """The agent's hands: one instance holds the settings and the timers.

    Args:
        settings: where state lives and which network namespace to act in.
        metrics: where ``agent.actions_done`` and ``agent.actions_failed``
            are counted.
    """

    def __init__(
        self, settings: Settings | None = None, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings if settings is not None else Settings()
        self.metrics = metrics if metrics is not None else Metrics()
        state = self.settings.state_dir
        self.cgroups = Cgroups(self.settings.cgroup_prefix, state / "cgroups.json")
        self.vault = Vault(state / "vault", state / "vault.key", self.settings.max_file)
        self.nft = nft.Nft(self.settings.netns)
        self.policy_handler: PolicyHandler | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._table_ready = False

    # -- process actions ---------------------------------------------------

    async def ping(self, args: dict[str, Any]) -> dict[str, Any]:
        """Answer, to show the agent takes commands (args: :class:`PingArgs`)."""
        a = parse("ping", args, PingArgs)
        return {"pong": True, "echo": a.echo, "pid": os.getpid(), "time_ns": now_ns()}

    async def kill(self, args: dict[str, Any]) -> dict[str, Any]:
        """Signal a process or, with ``tree``, all of it (args: :class:`KillArgs`).

        Raises:
            ActionError: a refused target, or one still running after ``wait``.
        """
        a = parse("kill", args, KillArgs)
        sig = signal.SIGKILL if a.signal == "KILL" else signal.SIGTERM
        procs.check_target(a.pid, a.start)
        if a.tree:
            pids = procs.stop_tree(a.pid)
            sent = procs.signal_all(pids, sig)
            procs.signal_all(pids, signal.SIGCONT)
        else:
            pids = [a.pid]
            sent = procs.signal_all(pids, sig)
        alive = await _wait_gone(sent, a.wait)
        if alive:
            msg = f"still running {a.wait} s after SIG{a.signal}: {alive}"
            raise ActionError(msg, "kill")
        logger.info("Killed %s with SIG%s.", sent, a.signal)
        return {"pid": a.pid, "signal": a.signal, "killed": sent}

    async def collect(self, args: dict[str, Any]) -> dict[str, Any]:
        """Evidence of a process (args: :class:`PidArgs`); see :func:`procs.collect`."""
        a = parse("collect", args, PidArgs)
        return await asyncio.to_thread(procs.collect, a.pid)

    # -- cgroups: freeze and jail -----------------------------------------

    def _capture(self, kind: str, a: FreezeArgs) -> tuple[str, dict[str, str]]:
        procs.check_target(a.pid, a.start)
        pids = [a.pid]
        if a.tree:
            procs.check_tree(a.pid)
            pids += [p for p in procs.descendants(a.pid) if p != os.getpid()]
        if kind == "jail":
            self._check_netns(pids)
        name = f"{kind}-{a.pid}"
        return name, self.cgroups.capture(name, pids)

    async def freeze(self, args: dict[str, Any]) -> dict[str, Any]:
        """Move a process to its own cgroup and freeze it (:class:`FreezeArgs`)."""
        a = parse("freeze", args, FreezeArgs)
        name, origins = await asyncio.to_thread(self._capture, "freeze", a)
        frozen = await asyncio.to_thread(self.cgroups.set_frozen, name, True)
        if not frozen:
            await self.thaw({"pid": a.pid})
            raise ActionError(f"pid {a.pid} did not freeze within 5 s", "freeze")
        logger.info("Froze %s in %s.", list(origins), name)
        return {"pid": a.pid, "cgroup": f"{self.cgroups.prefix}/{name}",
                "frozen": list(map(int, origins)), "origins": origins}  # fmt: skip

    async def thaw(self, args: dict[str, Any]) -> dict[str, Any]:
        """Undo :meth:`freeze`: thaw and move back (args: :class:`PidArgs`)."""
        a = parse("thaw", args, PidArgs)
        name = f"freeze-{a.pid}"
        return await asyncio.to_thread(self._thaw, name, a.pid)

    def _thaw(self, name: str, pid: int) -> dict[str, Any]:
        if name not in self.cgroups.records():
            raise ActionError(f"pid {pid} is not frozen by IMMUNE", "thaw")
        self.cgroups.set_frozen(name, False)
        moved = self.cgroups.release(name)
        logger.info("Thawed %s.", list(moved))
        return {"pid": pid, "thawed": list(map(int, moved)), "moved_to": moved}

    def _check_netns(self, pids: list[int]) -> None:
        # The jail's rules hold in the namespace nft runs in; a process of
        # another one (a container's) would not be cut off at all.
        # TODO(#4): jail those too, with rules in their own namespace.
        netns = self.settings.netns
        ours = os.stat(f"/run/netns/{netns}" if netns else "/proc/self/ns/net")
        for pid in pids:
            try:
                theirs = os.stat(f"/proc/{pid}/ns/net")
            except FileNotFoundError:
                continue
            if theirs.st_ino != ours.st_ino:
                msg = (
                    f"process {pid} is in another network namespace "
                    f"(net:[{theirs.st_ino}], the agent acts in net:[{ours.st_ino}]);"
                    " freeze it instead"
                )
                raise ActionError(msg, "jail")

    async def jail(self, args: dict[str, Any]) -> dict[str, Any]:
        """Cut a process off the network in its own cgroup (:class:`JailArgs`)."""
        a = parse("jail", args, JailArgs)
        await self._ensure_table()
        name, origins = await asyncio.to_thread(self._capture, "jail", a)
        ports = await asyncio.to_thread(_local_ports, [int(p) for p in origins])
        try:
            await self._nft(self._jail_script("add", name, ports))
            if a.freeze:
                await asyncio.to_thread(self.cgroups.set_frozen, name, True)
        except ActionError:
            await asyncio.to_thread(self.cgroups.release, name)
            raise
        self._save_ports(name, ports)
        if a.duration:
            self._later(f"jail-{a.pid}", a.duration, self.release, {"pid": a.pid})
        logger.info("Jailed %s in %s.", list(origins), name)
        return {"pid": a.pid, "cgroup": f"{self.cgroups.prefix}/{name}",
                "jailed": list(map(int, origins)), "ports": ports,
                "frozen": a.freeze, "duration": a.duration}  # fmt: skip

    async def release(self, args: dict[str, Any]) -> dict[str, Any]:
        """Undo :meth:`jail` (args: :class:`PidArgs`)."""
        a = parse("release", args, PidArgs)
        name = f"jail-{a.pid}"
        if name not in self.cgroups.records():
            raise ActionError(f"pid {a.pid} is not jailed by IMMUNE", "release")
        self._cancel(name)
        ports = self._load_ports(name)
        await self._unjail(name, ports)
        await asyncio.to_thread(self.cgroups.set_frozen, name, False)
        moved = await asyncio.to_thread(self.cgroups.release, name)
        self._save_ports(name, None)
        logger.info("Released %s.", list(moved))
        return {"pid": a.pid, "released": list(map(int, moved)), "ports": ports}

    def _jail_script(self, op: str, name: str, ports: list[int]) -> str:
        path = nft.quoted(self.cgroups.nft_path(name))
        script = nft.elements(op, "jail_cgroups", [path], None)
        if ports:
            script += nft.elements(op, "jail_ports", [str(p) for p in ports], None)
        return script

    async def _unjail(self, name: str, ports: list[int]) -> None:
        # A port another jail holds too stays in the set for that one.
        others = {
            port
            for other in self.cgroups.records()
            if other.startswith("jail-") and other != name
            for port in self._load_ports(other)
        }
        mine = [p for p in ports if p not in others]
        try:
            await self._nft(self._jail_script("delete", name, mine))
        except ActionError as exc:
            # The script is all or nothing: one element already gone (the
            # table was flushed by hand) must not keep the rest jailed.
            logger.warning(
                "Deleting jail %s elements one by one: %s.", name, printable(exc)
            )
            path = nft.quoted(self.cgroups.nft_path(name))
            lines = [nft.elements("delete", "jail_cgroups", [path], None)]
            lines += [
                nft.elements("delete", "jail_ports", [str(p)], None) for p in mine
            ]
            for line in lines:
                with contextlib.suppress(ActionError):
                    await self._nft(line)

    def _ports_file(self, name: str) -> Path:
        return self.settings.state_dir / f"{name}.ports"

    def _save_ports(self, name: str, ports: list[int] | None) -> None:
        path = self._ports_file(name)
        if ports is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(" ".join(map(str, ports)))

    def _load_ports(self, name: str) -> list[int]:
        try:
            return [int(p) for p in self._ports_file(name).read_text().split()]
        except FileNotFoundError:
            return []

    # -- network: isolate and block ---------------------------------------

    async def isolate(self, args: dict[str, Any]) -> dict[str, Any]:
        """Cut the host off but for loopback, the broker and ``allow``.

        Args are :class:`IsolateArgs`; a new isolation replaces the last.
        """
        a = parse("isolate", args, IsolateArgs)
        allowed = [
            allowed
            for e in a.allow
            for allowed in await _resolve(e.address, e.port, e.protocol)
        ]
        if self.settings.broker is not None:
            host, port = self.settings.broker
            allowed += await _resolve(host, port, "tcp")
        if not allowed:
            msg = "no broker to keep reachable: give allow=[{address, port}]"
            raise ActionError(msg, "isolate")
        await self._ensure_table()
        await self._nft(nft.isolate_script(allowed))
        self._cancel("isolate")
        if a.duration:
            self._later("isolate", a.duration, self.unisolate, {})
        kept = [[nft.element(x.net), x.port, x.protocol] for x in allowed]
        logger.warning("Isolated the host; kept %s.", kept)
        return {"isolated": True, "allowed": kept, "duration": a.duration}

    async def unisolate(self, args: dict[str, Any]) -> dict[str, Any]:
        """Undo :meth:`isolate` (no args)."""
        parse("unisolate", args, _Args)
        self._cancel("isolate")
        await self._ensure_table()
        await self._nft(nft.unisolate_script())
        logger.warning("Host isolation lifted.")
        return {"isolated": False}

    async def block(self, args: dict[str, Any]) -> dict[str, Any]:
        """Drop an address, a network or a port (args: :class:`BlockArgs`)."""
        a = parse("block", args, BlockArgs)
        script = self._block_script("add", "block", a)
        await self._ensure_table()
        await self._nft(script)
        logger.info("Blocked %s.", a.address or f"port {a.port}")
        return {"address": a.address, "port": a.port, "duration": a.duration}

    async def unblock(self, args: dict[str, Any]) -> dict[str, Any]:
        """Undo :meth:`block` of the same address or port."""
        a = parse("unblock", args, BlockArgs)
        script = self._block_script("delete", "unblock", a)
        await self._ensure_table()
        try:
            await self._nft(script)
        except ActionError as exc:
            what = a.address or f"port {a.port}"
            raise ActionError(f"{what} is not blocked ({exc})", "unblock") from exc
        return {"address": a.address, "port": a.port, "unblocked": True}

    def _block_script(self, op: str, action: str, a: BlockArgs) -> str:
        if (a.address is None) == (a.port is None):
            raise ActionError("give an address or a port (one of them)", action)
        if op == "delete" and a.duration is not None:
            raise ActionError("duration is for block, not unblock", action)
        if a.port is not None:
            return nft.elements(op, "block_ports", [str(a.port)], a.duration)
        try:
            net = nft.network(str(a.address))
        except ActionError as exc:
            raise ActionError(str(exc), action) from None
        return nft.elements(op, nft.address_set(net), [nft.element(net)], a.duration)

    # -- files and policy --------------------------------------------------

    async def quarantine(self, args: dict[str, Any]) -> dict[str, Any]:
        """Move a file into the vault (args: :class:`PathArgs`)."""
        a = parse("quarantine", args, PathArgs)
        return await asyncio.to_thread(self.vault.quarantine, a.path)

    async def restore(self, args: dict[str, Any]) -> dict[str, Any]:
        """Put a vault item back, checked (args: :class:`RestoreArgs`)."""
        a = parse("restore", args, RestoreArgs)
        return await asyncio.to_thread(self.vault.restore, a.id, a.overwrite)

    async def policy(self, args: dict[str, Any]) -> dict[str, Any]:
        """Hand ``args``, a new local policy, to the agent's policy handler."""
        if not isinstance(args, dict):
            raise ActionError("arguments must be a JSON object", "policy")
        if self.policy_handler is None:
            raise ActionError("this agent runs no local policy to update", "policy")
        try:
            result = self.policy_handler(args)
            if inspect.isawaitable(result):
                result = await result
        except ActionError:
            raise
        except ImmuneError as exc:
            # The policy's own error (PolicyError) names the key at fault.
            raise ActionError(str(exc), "policy") from exc
        if not isinstance(result, dict):
            msg = f"policy handler returned {type(result).__name__}, not a dict"
            raise ActionError(msg, "policy")
        return result

    # -- helpers -------------------------------------------------------------

    async def _nft(self, script: str) -> None:
        await asyncio.to_thread(self.nft.script, script)

    async def _ensure_table(self) -> None:
        if not self._table_ready:
            # The jail cgroups' path is checked here, before any rule uses it.
            self.cgroups.nft_path("jail-1")
            await asyncio.to_thread(nft.ensure_table, self.nft, JAIL_LEVEL)
            self._table_ready = True

    def _later(
        self,
        key: str,
        seconds: int,
        undo: Callable[[dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]],
        args: dict[str, Any],
    ) -> None:
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.pop(key, None)
            task = loop.create_task(undo(args), name=f"immune-undo-{key}")
            task.add_done_callback(_log_undo)

        self._cancel(key)
        self._timers[key] = loop.call_later(seconds, fire)

    def _cancel(self, key: str) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()


def _local_ports(pids: list[int]) -> list[int]:
    """The local ports of the TCP and UDP sockets ``pids`` hold open."""
    return sorted({s["local"][1] for pid in pids for s in procs.sockets(pid)})


def _log_undo(task: asyncio.Task[dict[str, Any]]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error(
            "Timed undo %s failed: %s.", task.get_name(), printable(task.exception())
        )


async def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    alive = [p for p in pids if not procs.gone(p)]
    while alive and loop.time() < deadline:
        await asyncio.sleep(0.02)
        alive = [p for p in alive if not procs.gone(p)]
    return alive


async def _resolve(host: str, port: int | None, protocol: str) -> list[nft.Allowed]:
    """``host`` (an address, network or name) as endpoints isolation allows."""
    proto: nft.Protocol = "udp" if protocol == "udp" else "tcp"
    try:
        return [nft.Allowed(nft.network(host), port, proto)]
    except ActionError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        )
    except OSError as exc:
        raise ActionError(f"cannot resolve {host!r}: {exc}", "isolate") from exc
    nets = {ipaddress.ip_network(str(info[4][0])) for info in infos}
    return [nft.Allowed(net, port, proto) for net in sorted(nets, key=str)]
