"""The Prometheus scrape endpoint: ``GET /metrics`` on ``metrics.listen``, 404 elsewhere.

A minimal HTTP/1.1 responder on the daemon's own event loop (no thread, unlike
prometheus_client's ``start_http_server``), so a wedged loop shows up as a failed scrape.
One request per connection (``Connection: close``), bounded header size and read timeout,
because a scraper needs nothing more and a slow client must not hold a task forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from types import TracebackType

from relayd.units import HostPort

log = logging.getLogger("relayd.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_HEADER_BYTES = 16 * 1024
READ_TIMEOUT = 10.0


class MetricsServer:
    """Serves ``render()`` (``Metrics.render``) at ``/metrics``.

    Use ``await start()`` / ``await close()`` or ``async with``. ``port`` is the bound port
    (useful with port 0 in tests). ``sock`` serves on an already-bound socket instead.
    """

    def __init__(self, listen: HostPort | None, render: Callable[[], bytes], *,
                 sock: socket.socket | None = None) -> None:
        if listen is None and sock is None:
            raise ValueError("MetricsServer needs a listen address or a socket")
        self._listen = listen
        self._render = render
        self._sock = sock
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        if self._sock is not None:
            self._server = await asyncio.start_server(self._handle, sock=self._sock,
                                                      limit=MAX_HEADER_BYTES)
        else:
            assert self._listen is not None
            self._server = await asyncio.start_server(self._handle, self._listen.host,
                                                      self._listen.port, limit=MAX_HEADER_BYTES)
        log.info("metrics: serving http://%s/metrics", self.address)

    @property
    def port(self) -> int:
        """The bound TCP port (after ``start``)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("metrics server is not running")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def address(self) -> str:
        if self._server is None or not self._server.sockets:
            return str(self._listen)
        host = self._server.sockets[0].getsockname()[0]
        return str(HostPort(host, self.port))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            # Python >= 3.12's wait_closed() also waits for open connections; an idle
            # scraper must not delay shutdown by the read timeout.
            for writer in list(self._clients):
                writer.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        try:
            await self._serve_one(reader, writer)
        finally:
            self._clients.discard(writer)

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body, extra = await self._respond(reader)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            writer.close()
            return
        head = (f"HTTP/1.1 {status}\r\nContent-Type: {extra.get('type', 'text/plain')}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n")
        if "allow" in extra:
            head += f"Allow: {extra['allow']}\r\n"
        try:
            writer.write(head.encode("ascii") + b"\r\n"
                         + (b"" if extra.get("head") else body))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[str, bytes, dict[str, str]]:
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        if len(raw) > MAX_HEADER_BYTES:
            return "431 Request Header Fields Too Large", b"", {}
        request_line = raw.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", b"bad request\n", {}
        method, target = parts[0], parts[1]
        path = target.split("?", 1)[0]
        if path != "/metrics":
            return "404 Not Found", b"not found; metrics are at /metrics\n", {}
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", b"method not allowed\n", {"allow": "GET, HEAD"}
        body = self._render()
        extra = {"type": CONTENT_TYPE}
        if method == "HEAD":
            extra["head"] = "1"
        return "200 OK", body, extra
