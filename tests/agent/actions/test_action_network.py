"""isolate, block and jail with nftables, inside network namespaces the test makes.

``net.host`` plays the machine under test: the responder runs nft there
(``Settings.netns``). ``net.peer`` plays the outside world, joined by a veth
pair, with echo servers on real TCP ports. Connectivity is checked with real
sockets made inside ``net.host``. The machine's own ruleset is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from actionkit import Net, cleanup_cgroups, in_netns, ip, make_responder

from immune.agent.actions import ACTIONS, ActionError, Responder, configure
from immune.agent.actions.cgroups import cgroup2_root

BROKER_PORT, OTHER_PORT = 1883, 8080


def _echo(server: socket.socket) -> None:
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        threading.Thread(target=_echo_one, args=(conn,), daemon=True).start()


def _echo_one(conn: socket.socket) -> None:
    # A client killed mid-connection resets it; that ends this echo only.
    with conn, contextlib.suppress(OSError):
        while data := conn.recv(64):
            conn.sendall(data)


@pytest.fixture
def servers(net: Net) -> Iterator[None]:
    """Echo servers in the peer namespace on BROKER_PORT and OTHER_PORT."""
    made = [
        in_netns(
            net.peer,
            lambda p=port: socket.create_server(
                ("::", p), family=socket.AF_INET6, dualstack_ipv6=True
            ),
        )
        for port in (BROKER_PORT, OTHER_PORT)
    ]
    for server in made:
        threading.Thread(target=_echo, args=(server,), daemon=True).start()
    # IPv6 needs a moment after the links come up (neighbour discovery).
    deadline = time.monotonic() + 10
    while not reachable(net, OTHER_PORT, 0.3, net.peer_addr6):
        assert time.monotonic() < deadline, "IPv6 between the namespaces never worked"
        time.sleep(0.1)
    yield
    for server in made:
        server.shutdown(socket.SHUT_RDWR)
        server.close()


@pytest.fixture
def responder(net: Net, servers: None, tmp_path: Path) -> Iterator[Responder]:
    mine = make_responder(tmp_path, netns=net.host, broker=(net.peer_addr, BROKER_PORT))
    previous = configure(mine)
    yield mine
    configure(previous)
    cleanup_cgroups(mine)


def reachable(
    net: Net, port: int, timeout: float = 0.5, address: str | None = None
) -> bool:
    """Whether a TCP echo to the peer's ``port`` works from the host namespace."""
    target = address or net.peer_addr

    def probe() -> bool:
        try:
            with socket.create_connection((target, port), timeout=timeout) as s:
                s.sendall(b"ping")
                return s.recv(4) == b"ping"
        except OSError:
            return False

    return in_netns(net.host, probe)


async def eventually(
    net: Net, port: int, want: bool, seconds: float, address: str | None = None
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while reachable(net, port, 0.3, address) != want:
        assert loop.time() < deadline, (
            f"port {port} reachable={not want} after {seconds} s"
        )
        await asyncio.sleep(0.2)


def ruleset(net: Net) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", net.host, "nft", "list", "table", "inet", "immune"],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


async def test_isolate_keeps_only_the_broker(net: Net, responder: Responder) -> None:
    assert reachable(net, BROKER_PORT) and reachable(net, OTHER_PORT)

    result = await ACTIONS["isolate"]({})
    assert result["allowed"] == [[net.peer_addr, BROKER_PORT, "tcp"]]
    assert reachable(net, BROKER_PORT)
    assert not reachable(net, OTHER_PORT)
    assert "drop" in ruleset(net)

    await ACTIONS["unisolate"]({})
    assert reachable(net, BROKER_PORT) and reachable(net, OTHER_PORT)


async def test_isolate_with_an_extra_allowed_endpoint(
    net: Net, responder: Responder
) -> None:
    await ACTIONS["isolate"](
        {"allow": [{"address": net.peer_addr, "port": OTHER_PORT}]}
    )
    assert reachable(net, BROKER_PORT) and reachable(net, OTHER_PORT)
    await ACTIONS["unisolate"]({})


async def test_isolate_expires(net: Net, responder: Responder) -> None:
    await ACTIONS["isolate"]({"duration": 1})
    assert not reachable(net, OTHER_PORT)
    await eventually(net, OTHER_PORT, True, 5)


async def test_isolate_without_a_broker_needs_allow(net: Net, tmp_path: Path) -> None:
    alone = make_responder(tmp_path, netns=net.host)
    with pytest.raises(ActionError, match="allow"):
        await alone.isolate({})


async def test_block_and_unblock_an_address(net: Net, responder: Responder) -> None:
    await ACTIONS["block"]({"address": net.peer_addr})
    assert not reachable(net, BROKER_PORT) and not reachable(net, OTHER_PORT)
    await ACTIONS["unblock"]({"address": net.peer_addr})
    assert reachable(net, BROKER_PORT) and reachable(net, OTHER_PORT)


async def test_block_an_ipv6_address(net: Net, responder: Responder) -> None:
    assert reachable(net, OTHER_PORT, address=net.peer_addr6)
    await ACTIONS["block"]({"address": net.peer_addr6})
    assert not reachable(net, OTHER_PORT, address=net.peer_addr6)
    assert reachable(net, OTHER_PORT)  # IPv4 to the same peer is not blocked
    await ACTIONS["unblock"]({"address": net.peer_addr6})
    assert reachable(net, OTHER_PORT, address=net.peer_addr6)


async def test_isolate_cuts_connections_made_before(
    net: Net, responder: Responder
) -> None:
    conn = in_netns(
        net.host, lambda: socket.create_connection((net.peer_addr, OTHER_PORT), 2)
    )
    with conn:
        conn.settimeout(1)
        conn.sendall(b"a")
        assert conn.recv(1) == b"a"
        await ACTIONS["isolate"]({})
        conn.sendall(b"b")
        with pytest.raises(TimeoutError):
            conn.recv(1)
        await ACTIONS["unisolate"]({})
        conn.settimeout(15)
        assert conn.recv(1) == b"b"  # retransmitted once the way is open


async def test_isolate_over_ipv6(net: Net, servers: None, tmp_path: Path) -> None:
    broker = (net.peer_addr6, BROKER_PORT)
    six = make_responder(tmp_path, netns=net.host, broker=broker)
    await six.isolate({})
    # Forget the peer's link address: reaching it now needs neighbour discovery.
    ip("-n", net.host, "-6", "neigh", "flush", "all")
    assert reachable(net, BROKER_PORT, address=net.peer_addr6)
    assert not reachable(net, OTHER_PORT, address=net.peer_addr6)
    assert not reachable(net, BROKER_PORT)  # the broker's IPv4 was not allowed
    await six.unisolate({})
    assert reachable(net, OTHER_PORT, address=net.peer_addr6)


async def test_block_a_network(net: Net, responder: Responder) -> None:
    prefix = net.peer_addr.rsplit(".", 1)[0] + ".0/24"
    await ACTIONS["block"]({"address": prefix})
    assert not reachable(net, OTHER_PORT)
    await ACTIONS["unblock"]({"address": prefix})
    assert reachable(net, OTHER_PORT)


async def test_block_and_unblock_a_port(net: Net, responder: Responder) -> None:
    await ACTIONS["block"]({"port": OTHER_PORT})
    assert reachable(net, BROKER_PORT)
    assert not reachable(net, OTHER_PORT)
    await ACTIONS["unblock"]({"port": OTHER_PORT})
    assert reachable(net, OTHER_PORT)


async def test_block_expires_in_the_kernel(net: Net, responder: Responder) -> None:
    await ACTIONS["block"]({"port": OTHER_PORT, "duration": 1})
    assert "timeout 1s" in ruleset(net)
    assert not reachable(net, OTHER_PORT)
    await eventually(net, OTHER_PORT, True, 5)


async def test_unblock_of_what_is_not_blocked(net: Net, responder: Responder) -> None:
    with pytest.raises(ActionError, match="not blocked"):
        await ACTIONS["unblock"]({"address": "192.0.2.9"})


JAILED = """
import socket, sys, threading
peer, port = sys.argv[1], int(sys.argv[2])
old = socket.create_connection((peer, port), timeout=2)

def echo(server):
    while True:
        conn, _ = server.accept()
        conn.sendall(conn.recv(1))
        conn.close()

print("ready", flush=True)
for line in sys.stdin:
    what, value = line.split()
    if what == "listen":
        server = socket.create_server(("0.0.0.0", int(value)))
        threading.Thread(target=echo, args=(server,), daemon=True).start()
        print("ok", flush=True)
        continue
    try:
        if what == "old":
            s = old
        else:
            s = socket.create_connection((peer, port), timeout=float(value))
        s.settimeout(float(value))
        s.sendall(b"x")
        ok = s.recv(1) == b"x"
    except OSError:
        ok = False
    print("ok" if ok else "fail", flush=True)
"""


class Jailed:
    """A process in the host namespace with a connection made before the jail."""

    def __init__(self, net: Net) -> None:
        argv = ["ip", "netns", "exec", net.host, sys.executable, "-c", JAILED]
        self.proc = subprocess.Popen(
            [*argv, net.peer_addr, str(OTHER_PORT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.readline() == "ready"

    def readline(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def can(self, what: str, timeout: float) -> bool:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{what} {timeout}\n")
        self.proc.stdin.flush()
        return self.readline() == "ok"

    def close(self) -> None:
        self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def jailed(net: Net, responder: Responder) -> Iterator[Jailed]:
    proc = Jailed(net)
    yield proc
    with contextlib.suppress(ActionError):
        asyncio.run(responder.release({"pid": proc.proc.pid}))
    proc.close()


async def test_jail_and_release(net: Net, responder: Responder, jailed: Jailed) -> None:
    assert jailed.can("old", 2) and jailed.can("new", 2)

    result = await ACTIONS["jail"]({"pid": jailed.proc.pid})
    assert result["jailed"] == [jailed.proc.pid]
    assert result["ports"]  # the connection made before the jail
    with open(f"/proc/{jailed.proc.pid}/cgroup") as f:
        assert f"/{responder.settings.cgroup_prefix}/jail-{jailed.proc.pid}" in f.read()
    assert not jailed.can("new", 1)
    assert not jailed.can("old", 1)
    assert reachable(net, OTHER_PORT)  # the rest of the host is not jailed

    result = await ACTIONS["release"]({"pid": jailed.proc.pid})
    assert result["released"] == [jailed.proc.pid]
    assert jailed.can("new", 2)
    assert jailed.can("old", 15)  # the dropped byte comes through on retransmit


async def test_release_of_a_process_not_jailed(net: Net, responder: Responder) -> None:
    with pytest.raises(ActionError, match="not jailed"):
        await ACTIONS["release"]({"pid": 12345})


async def test_jail_frozen_for_a_while(
    net: Net, responder: Responder, jailed: Jailed
) -> None:
    pid = jailed.proc.pid
    result = await ACTIONS["jail"]({"pid": pid, "freeze": True, "duration": 1})
    assert result["frozen"] is True
    cgroup = cgroup2_root() / responder.settings.cgroup_prefix / f"jail-{pid}"
    assert "frozen 1" in (cgroup / "cgroup.events").read_text().splitlines()

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while cgroup.exists():
        assert loop.time() < deadline, "the jail did not expire"
        await asyncio.sleep(0.1)
    assert f"jail-{pid}" not in ruleset(net)
    assert jailed.can("new", 2)


def peer_reaches(net: Net, port: int) -> bool:
    """Whether the peer can talk to a server on the host namespace's ``port``."""

    def probe() -> bool:
        try:
            with socket.create_connection((net.host_addr, port), timeout=1) as s:
                s.sendall(b"z")
                return s.recv(1) == b"z"
        except OSError:
            return False

    return in_netns(net.peer, probe)


async def test_jail_cuts_a_server_started_inside(
    net: Net, responder: Responder, jailed: Jailed
) -> None:
    await ACTIONS["jail"]({"pid": jailed.proc.pid})
    assert jailed.can("listen", 7001)
    assert not peer_reaches(net, 7001)
    await ACTIONS["release"]({"pid": jailed.proc.pid})
    assert peer_reaches(net, 7001)


async def test_freeze_of_a_jailed_process_is_refused(
    net: Net, responder: Responder, jailed: Jailed
) -> None:
    pid = jailed.proc.pid
    await ACTIONS["jail"]({"pid": pid})
    with pytest.raises(ActionError, match="held in"):
        await ACTIONS["freeze"]({"pid": pid})
    with open(f"/proc/{pid}/cgroup") as f:
        assert f"/jail-{pid}" in f.read()
    assert not jailed.can("new", 1)


async def test_release_after_the_sets_were_flushed(
    net: Net, responder: Responder, jailed: Jailed
) -> None:
    pid = jailed.proc.pid
    await ACTIONS["jail"]({"pid": pid})
    flush = ["ip", "netns", "exec", net.host, "nft", "flush", "set", "inet", "immune"]
    subprocess.run([*flush, "jail_ports"], check=True)
    result = await ACTIONS["release"]({"pid": pid})
    assert result["released"] == [pid]
    assert f"jail-{pid}" not in ruleset(net)
    assert jailed.can("new", 2)


async def test_jail_refuses_a_process_of_another_namespace(
    net: Net, responder: Responder
) -> None:
    # A sleep in the machine's own namespace: rules in net.host would not hold it.
    proc = subprocess.Popen(["sleep", "300"])
    try:
        with pytest.raises(ActionError, match="another network namespace"):
            await ACTIONS["jail"]({"pid": proc.pid})
        with open(f"/proc/{proc.pid}/cgroup") as f:
            assert responder.settings.cgroup_prefix not in f.read()
    finally:
        proc.kill()
        proc.wait()
