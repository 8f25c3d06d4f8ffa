"""Kept-alive connections must not pay Nagle's 40 ms (DESIGN.md, uvicorn issue #3149)."""

import socket
import statistics
import time

import httpx
import pytest

from service.http import NoDelayHTTPProtocol
from tests.support import free_port, wait_ready


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


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_multi_worker_api_answers_kept_alive_requests_without_delayed_ack_stall(processes, loop):
    port = free_port()
    api = processes.start("api", "--host", "127.0.0.1", "--port", str(port), "--workers", "2", "--loop", loop,
                          name=f"api-{loop}")
    base_url = f"http://127.0.0.1:{port}"
    wait_ready(base_url, api)
    with httpx.Client(base_url=base_url) as client:
        latencies = []
        for _ in range(30):
            start = time.perf_counter()
            client.get("/experiments").raise_for_status()
            latencies.append(time.perf_counter() - start)
    # With TCP_NODELAY off every request after the first takes ~40 ms (measured: 44 ms
    # median with plain uvicorn --workers 2 --loop asyncio); with it on, ~1-2 ms.
    assert statistics.median(latencies) < 0.020, latencies
