"""A second host on this machine: a network namespace joined to this one by a veth link.

A worker started in it (RemoteHost.command) has a network stack of its own: it reaches
PostgreSQL and Redis only across the link, through forwarders on this end
(RemoteHost.reach), so that its jobs cross a real network link, and cutting the link
(RemoteHost.cut) partitions it from both while the processes on this side carry on.

Used by tests/test_multihost.py and bench/chaos.py's partition scenario. It needs root
and iproute2's ``ip``: ``why_unavailable`` says what is missing. Nothing is written to the
system's configuration: the namespace, the veth pair and its addresses are removed on the
way out, and the servers behind the forwarders keep listening on loopback only.
"""

import asyncio
import contextlib
import fcntl
import functools
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

# The links' /30s are taken from here, never overlapping a route this machine already has.
LINK_BLOCK = ipaddress.ip_network("10.200.0.0/16")
# Held while a /30 is chosen and configured: two runs at once never pick the same one.
ADDRESS_LOCK = Path(tempfile.gettempdir()) / "nclab-netns.lock"


def why_unavailable() -> str | None:
    """Why no RemoteHost can be made here (not root, tools missing, namespaces refused), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "unshare", "hostname") if shutil.which(tool) is None]
    if missing:
        return f"network namespaces need {', '.join(missing)}"
    probe = f"nclab-probe-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)  # a container may refuse it even to root
    except RuntimeError as exc:
        return f"no network namespace here: {exc}"
    _ip_quietly("netns", "delete", probe)
    return None


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _ip_quietly(*args: str) -> None:
    """For cleanup: what is already gone (the namespace took its end of the veth with it) is no error."""
    subprocess.run(["ip", *args], capture_output=True)


@dataclass
class RemoteHost:
    """A network namespace named ``name`` (also the hostname of what runs in it), linked to this one.

    ``root_address`` is this namespace's end of the link, the one address the remote host
    can dial; ``host_address`` is the remote host's own.
    """

    name: str
    root_side: str  # the veth end in this namespace
    host_side: str  # the veth end in the remote host
    root_address: str
    host_address: str
    forwarders: "Forwarders"  # those reach() started, closed with the host

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run in the namespace, under a hostname of its own, so that what it records as its
        host (a job's ``worker``: "<hostname> pid <pid>") names this host. Each step execs the next:
        the process started with this command is ``argv``'s own."""
        return ["ip", "netns", "exec", self.name, "unshare", "--uts",
                "sh", "-c", 'hostname "$0" && exec "$@"', self.name, *argv]

    def reach(self, url: str) -> str:
        """``url`` as the remote host dials it: the same server, through a forwarder on this end of the link.

        The URL must name its port (postgresql://...@127.0.0.1:5432/..., redis://127.0.0.1:6379/0).
        """
        parts = urlsplit(url)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"{url}: a URL with a host and a port, please")
        port = self.forwarders.add(self.root_address, parts.hostname, parts.port)
        credentials, _, _ = parts.netloc.rpartition("@")
        address = f"{self.root_address}:{port}"
        return urlunsplit(parts._replace(netloc=f"{credentials}@{address}" if credentials else address))

    def cut(self) -> None:
        """Partition the remote host: this end of the link goes down, as a switch port would. The remote
        host is not told: its packets vanish, and its open connections hang rather than fail."""
        _ip("link", "set", self.root_side, "down")

    def restore(self) -> None:
        """The link comes back: connections that hung resume once TCP retransmits."""
        _ip("link", "set", self.root_side, "up")


@contextlib.contextmanager
def remote_host() -> Iterator[RemoteHost]:
    """A RemoteHost for the duration, removed afterwards with its link and forwarders.

    Stop the processes started in it before leaving: a namespace outlives its name while a
    process still runs in it (cut off from everything, since its link is gone).
    """
    token = secrets.token_hex(3)  # interface names have 15 characters at most
    name = f"nclab-{token}"
    with contextlib.ExitStack() as cleanup:
        _ip("netns", "add", name)
        cleanup.callback(_ip_quietly, "netns", "delete", name)
        root_side, host_side = f"{name}-r", f"{name}-h"
        with _address_lock():
            link = _unused_link()
            root_address, host_address = (str(address) for address in link.hosts())
            _ip("link", "add", root_side, "type", "veth", "peer", "name", host_side, "netns", name)
            cleanup.callback(_ip_quietly, "link", "delete", root_side)  # deletes both ends
            _ip("address", "add", f"{root_address}/{link.prefixlen}", "dev", root_side)
        _ip("link", "set", root_side, "up")
        _ip("-n", name, "address", "add", f"{host_address}/{link.prefixlen}", "dev", host_side)
        _ip("-n", name, "link", "set", host_side, "up")
        forwarders = Forwarders()
        cleanup.callback(forwarders.close)
        yield RemoteHost(name, root_side, host_side, root_address, host_address, forwarders)


@contextlib.contextmanager
def _address_lock() -> Iterator[None]:
    with open(ADDRESS_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _unused_link() -> ipaddress.IPv4Network:
    """A /30 of LINK_BLOCK that overlaps no route of this namespace, in any routing table (the
    local table lists every address in use). Call it holding the address lock, and add the
    address before letting go: the next caller then sees it."""
    routes = json.loads(_ip("-json", "-4", "route", "show", "table", "all"))
    taken = [ipaddress.ip_network(route["dst"], strict=False) for route in routes if route["dst"] != "default"]
    links = list(LINK_BLOCK.subnets(new_prefix=30))
    while True:
        link = secrets.choice(links)
        if not any(link.overlaps(route) for route in taken):
            return link


class Forwarders:
    """TCP forwarders, served by one asyncio loop in a thread of this process: each connection
    accepted is piped, byte for byte and both ways, to its target."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="forwarders", daemon=True)
        self._thread.start()
        self._servers: list[asyncio.Server] = []
        self._pipes: set[asyncio.Task] = set()
        self._sockets: set[asyncio.StreamWriter] = set()  # both ends of every forwarded connection

    def add(self, listen_host: str, target_host: str, target_port: int) -> int:
        """Forward connections to a free port of ``listen_host`` to the target; that port."""
        serve = asyncio.start_server(functools.partial(self._pipe, target_host, target_port), listen_host, 0)
        server = asyncio.run_coroutine_threadsafe(serve, self._loop).result()
        self._servers.append(server)
        return server.sockets[0].getsockname()[1]

    async def _pipe(self, target_host: str, target_port: int, client_reader: asyncio.StreamReader,
                    client_writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection(target_host, target_port)
        except OSError:
            client_writer.close()  # the client sees the refusal as a closed connection
            return
        task = asyncio.current_task()
        assert task is not None  # a connection's handler runs as a task of its own
        self._pipes.add(task)
        self._sockets.update((client_writer, target_writer))
        try:
            await asyncio.gather(_copy(client_reader, target_writer), _copy(target_reader, client_writer))
        finally:
            self._pipes.discard(task)
            self._sockets.difference_update((client_writer, target_writer))

    def close(self) -> None:
        """Stop listening and close every forwarded connection, then the loop."""
        async def shutdown() -> None:
            for server in self._servers:
                server.close()
            # Aborted, not closed: a close waits to flush what a partitioned peer will never read. An
            # aborted socket ends its reads, so each pipe ends as if its connection had.
            for writer in self._sockets:
                writer.transport.abort()
            await asyncio.gather(*self._pipes)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until the reading side ends, then close the writing side: the end of one direction
    ends the other, since closing a socket ends both."""
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass  # a reset or an unreachable peer ends the connection like an end of stream
    finally:
        writer.close()
