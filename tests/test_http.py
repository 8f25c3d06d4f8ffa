"""Kept-alive connections must not pay Nagle's 40 ms (docs/operations.md, "TCP_NODELAY"; uvicorn issue #3149)."""

import ctypes
import os
import socket
from pathlib import Path

import httpx
import pytest

from service.http import NoDelayHTTPProtocol
from service.lifetime import children
from tests.support import free_port, wait_ready

SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture


class _FakeTransport:
    def __init__(self, sock):
        self.sock = sock

    def get_extra_info(self, name, default=None):
        return self.sock if name == "socket" else default


def test_protocol_turns_nodelay_on_for_sockets_created_without_tcp_proto():
    # uvicorn's multi-worker listener is socket.socket(AF_INET) with proto 0, so asyncio's
    # own TCP_NODELAY (which checks proto == IPPROTO_TCP) is skipped for accepted sockets.
    listener = socket.socket(socket.AF_INET)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    try:
        assert accepted.proto == 0
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        protocol = NoDelayHTTPProtocol.__new__(NoDelayHTTPProtocol)
        try:
            protocol.connection_made(_FakeTransport(accepted))
        except AttributeError:
            pass  # the fake transport has no more to give the real protocol; the option is set first
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        for sock in (client, accepted, listener):
            sock.close()


def _server_end_nodelay(pids: set[int], server_port: int, client_port: int) -> int:
    """TCP_NODELAY of the server's end of the connection from ``client_port``, read from the
    socket itself: a copy of the file descriptor of the process that holds it (pidfd_getfd)."""
    inodes = {fields[9] for fields in (line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:])
              if int(fields[1].rsplit(":", 1)[1], 16) == server_port
              and int(fields[2].rsplit(":", 1)[1], 16) == client_port}
    assert len(inodes) == 1, inodes
    link = f"socket:[{inodes.pop()}]"
    libc = ctypes.CDLL(None, use_errno=True)
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) != link:
                    continue
            except OSError:
                continue
            pidfd = os.pidfd_open(pid)
            try:
                copy = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(fd.name), 0)
                if copy < 0:
                    pytest.skip(f"pidfd_getfd refused here: {os.strerror(ctypes.get_errno())}")
            finally:
                os.close(pidfd)
            with socket.socket(fileno=copy) as server_end:
                return server_end.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    raise AssertionError(f"no process of {pids} holds {link}")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_multi_worker_api_turns_nodelay_on_for_kept_alive_connections(processes, loop):
    """The option on the server's end of a real connection to `nclab api --workers 2`: with it off,
    every request after the first on that connection would take a delayed ACK, ~40 ms (measured:
    44 ms median with plain uvicorn --workers 2 --loop asyncio; ~1-2 ms with it on). How long
    requests take on this machine is for bench/, not for an assertion."""
    port = free_port()
    api = processes.start_api(port, "--host", "127.0.0.1", "--loop", loop, workers=2, name=f"api-{loop}")
    base_url = f"http://127.0.0.1:{port}"
    wait_ready(base_url, api)
    with httpx.Client(base_url=base_url) as client:
        ports = set()
        for _ in range(3):
            response = client.get("/experiments").raise_for_status()
            ports.add(response.extensions["network_stream"].get_extra_info("socket").getsockname()[1])
        assert len(ports) == 1  # one kept-alive connection
        assert _server_end_nodelay({api.pid} | children(api.pid), port, ports.pop()) != 0
