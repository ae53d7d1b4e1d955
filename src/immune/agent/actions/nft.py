"""IMMUNE's nftables table: host isolation, blocks and jails.

Everything lives in one table, ``inet immune``, made on first use and never
touching another table. Its base chains run before the usual filter priority
and only ever drop (or accept what isolation must keep), so removing the
table undoes all of IMMUNE's network actions:

- ``block4``, ``block6`` (addresses and networks) and ``block_ports`` are
  sets with per-element timeouts: the kernel itself expires a block given a
  duration.
- ``isolate_in``, ``isolate_out`` and ``isolate_fwd`` are empty until the
  host is isolated; then they accept loopback and the allowed endpoints
  (the broker) and IPv6 neighbour discovery, and drop the rest.
- ``jail_cgroups`` holds IMMUNE's jail cgroups: sockets made by a process in
  one are dropped (``socket cgroupv2``). A socket opened before the jail keeps
  the cgroup it was made in, so the jail also puts the local ports of the
  process's existing sockets in ``jail_ports``.

Scripts go to ``nft -f -`` on stdin, built only from checked values
(:mod:`ipaddress` objects, ints and IMMUNE's own cgroup names); no shell.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import subprocess
import threading
from dataclasses import dataclass
from typing import Literal

from immune.agent.actions.base import ActionError, check_name
from immune.safe import printable

logger = logging.getLogger(__name__)

TABLE = "inet immune"
CLONE_NEWNET = 0x40000000

Address = ipaddress.IPv4Network | ipaddress.IPv6Network
Protocol = Literal["tcp", "udp"]

_SCHEMA = """\
table inet immune {
    set block4 { type ipv4_addr; flags interval, timeout; }
    set block6 { type ipv6_addr; flags interval, timeout; }
    set block_ports { type inet_service; flags timeout; }
    set jail_cgroups { typeof socket cgroupv2 level %(level)d; }
    set jail_ports { type inet_service; }
    chain isolate_in { }
    chain isolate_out { }
    chain isolate_fwd { }
    chain input {
        type filter hook input priority filter - 10; policy accept;
        socket cgroupv2 level %(level)d @jail_cgroups drop
        meta l4proto { tcp, udp } th dport @jail_ports drop
        ip saddr @block4 drop
        ip6 saddr @block6 drop
        meta l4proto { tcp, udp } th dport @block_ports drop
        jump isolate_in
    }
    chain output {
        type filter hook output priority filter - 10; policy accept;
        socket cgroupv2 level %(level)d @jail_cgroups drop
        meta l4proto { tcp, udp } th sport @jail_ports drop
        ip daddr @block4 drop
        ip6 daddr @block6 drop
        meta l4proto { tcp, udp } th dport @block_ports drop
        jump isolate_out
    }
    chain forward {
        type filter hook forward priority filter - 10; policy accept;
        ip saddr @block4 drop
        ip daddr @block4 drop
        ip6 saddr @block6 drop
        ip6 daddr @block6 drop
        meta l4proto { tcp, udp } th dport @block_ports drop
        jump isolate_fwd
    }
}
"""


def _setns(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


class Nft:
    """Runs ``nft``, in the agent's network namespace or a named one.

    For a named one, ``nft`` is started from a thread of its own that entered
    that namespace with ``setns(2)`` (a child inherits the namespaces of the
    thread that forks it); the thread ends with the call, so no other code
    runs in the wrong namespace. The mount namespace stays the agent's, where
    nft finds ``/sys/fs/cgroup`` to resolve jail cgroups.

    Args:
        netns: a name under ``/run/netns`` (``ip netns add``), or None.
        binary: the nft program.
    """

    def __init__(self, netns: str | None = None, binary: str = "nft") -> None:
        self.netns = None if netns is None else check_name(netns, "netns")
        self.binary = binary

    def run(self, args: list[str], script: str | None = None) -> str:
        """Run ``nft <args>`` (blocking), feeding ``script`` on stdin.

        Returns:
            What nft printed.

        Raises:
            ActionError: nft is missing or refused; its message is kept.
        """
        if self.netns is None:
            return self._run(args, script)
        result: list[str] = []
        errors: list[BaseException] = []

        def body() -> None:
            try:
                try:
                    _setns(str(self.netns))
                except OSError as exc:
                    msg = f"cannot enter network namespace {self.netns}: {exc}"
                    raise ActionError(msg) from exc
                result.append(self._run(args, script))
            except BaseException as exc:  # handed to the caller's thread
                errors.append(exc)

        thread = threading.Thread(target=body, name="immune-nft-netns")
        thread.start()
        thread.join()
        if errors:
            raise errors[0]
        return result[0]

    def _run(self, args: list[str], script: str | None) -> str:
        try:
            done = subprocess.run(
                [self.binary, *args],
                input=script,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except FileNotFoundError:
            msg = (
                f"{self.binary} not found: install nftables (apt-get install nftables)"
            )
            raise ActionError(msg) from None
        if done.returncode != 0:
            raise ActionError(f"nft refused: {done.stderr.strip()[:500]}")
        return done.stdout

    def script(self, text: str) -> None:
        """Apply ``text`` atomically (``nft -f -``)."""
        logger.debug("Applying nft script: %s.", printable(text, 4096))
        self.run(["-f", "-"], text)

    def has_table(self) -> bool:
        try:
            self.run(["list", "table", *TABLE.split()])
        except ActionError:
            return False
        return True


def ensure_table(nft: Nft, jail_level: int) -> None:
    """Make the ``inet immune`` table unless it exists."""
    if not nft.has_table():
        nft.script(_SCHEMA % {"level": jail_level})
        logger.info("Made the nftables table %s.", TABLE)


def network(value: str) -> Address:
    """``value`` as an address or network (``192.0.2.7``, ``2001:db8::/32``).

    Raises:
        ActionError: it is neither.
    """
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        msg = f"{value!r} is not an IP address or network (e.g. 192.0.2.7, 10.0.0.0/8)"
        raise ActionError(msg) from None


def element(net: Address) -> str:
    """How nft spells ``net`` in a set: an address alone when it is one."""
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return str(net)


def address_set(net: Address) -> str:
    return "block4" if net.version == 4 else "block6"


def elements(op: str, set_name: str, items: list[str], timeout: int | None) -> str:
    """An ``add``/``delete element`` line; ``timeout`` in seconds for adds."""
    suffix = f" timeout {timeout}s" if timeout else ""
    body = ", ".join(f"{item}{suffix}" for item in items)
    return f"{op} element {TABLE} {set_name} {{ {body} }}\n"


@dataclass(frozen=True, slots=True)
class Allowed:
    """An endpoint isolation keeps reachable: a network and maybe a port."""

    net: Address
    port: int | None = None
    protocol: Protocol = "tcp"

    def rules(self) -> tuple[str, str]:
        """The accept rules for (input, output)."""
        ip = "ip" if self.net.version == 4 else "ip6"
        addr = element(self.net)
        if self.port is None:
            return f"{ip} saddr {addr} accept", f"{ip} daddr {addr} accept"
        return (
            f"{ip} saddr {addr} {self.protocol} sport {self.port} accept",
            f"{ip} daddr {addr} {self.protocol} dport {self.port} accept",
        )


_ND = "{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert }"


def isolate_script(allowed: list[Allowed]) -> str:
    """Replace the isolation chains with: loopback and ``allowed``, else drop."""
    lines = [f"flush chain {TABLE} isolate_{c}\n" for c in ("in", "out", "fwd")]
    lines.append(f"add rule {TABLE} isolate_in iif lo accept\n")
    lines.append(f"add rule {TABLE} isolate_out oif lo accept\n")
    # IPv6 finds its neighbours with ICMPv6 (IPv4's ARP is not in the inet
    # family): without these the broker's IPv6 address is unreachable too.
    for chain in ("in", "out"):
        lines.append(f"add rule {TABLE} isolate_{chain} icmpv6 type {_ND} accept\n")
    for item in allowed:
        rule_in, rule_out = item.rules()
        lines.append(f"add rule {TABLE} isolate_in {rule_in}\n")
        lines.append(f"add rule {TABLE} isolate_out {rule_out}\n")
    for chain in ("in", "out", "fwd"):
        lines.append(f"add rule {TABLE} isolate_{chain} counter drop\n")
    return "".join(lines)


def unisolate_script() -> str:
    return "".join(f"flush chain {TABLE} isolate_{c}\n" for c in ("in", "out", "fwd"))


def quoted(cgroup_path: str) -> str:
    """A cgroup path of IMMUNE's own as an nft string."""
    for part in cgroup_path.split("/"):
        check_name(part, "cgroup path component")
    return f'"{cgroup_path}"'
