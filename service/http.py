"""uvicorn's HTTP protocol with TCP_NODELAY forced on every accepted connection.

With ``--workers`` > 1, uvicorn 0.54 hands the listening socket to its worker processes
and the accepted sockets come out without TCP_NODELAY (uvicorn issue #3149). A response
is written in two segments (head, then body), so Nagle's algorithm holds the second until
the client's delayed ACK: about 40 ms on every request after the first on a kept-alive
connection. Setting the option ourselves removes that wait in every configuration.
"""

import asyncio
import socket

from uvicorn.protocols.http.auto import AutoHTTPProtocol


# AutoHTTPProtocol is a variable (httptools' protocol or h11's, whichever is installed), which mypy
# does not take as a base class.
class NoDelayHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    def connection_made(self, transport: asyncio.Transport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)


HTTP_PROTOCOL = f"{__name__}:NoDelayHTTPProtocol"
