"""A raw SMTP client for tests that need exact bytes on the wire (smuggling, pipelining), and
``smtp_greets``, the blocking "does it answer 220 yet" probe used to wait for a server."""

from __future__ import annotations

import asyncio
import contextlib
import socket


def smtp_greets(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """Whether an SMTP server on ``host``:``port`` answers with a 220 greeting now."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            return s.recv(3) == b"220"
    except OSError:
        return False


class RawClient:
    """Line-level SMTP client: ``send`` raw bytes, ``reply`` reads one (multi-line) reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    @classmethod
    async def greeted(cls, port: int, host: str = "127.0.0.1") -> RawClient:
        """Connected, and the server's 220 greeting read (AssertionError for any other)."""
        client = await cls.connect(host, port)
        code, text = await client.reply()
        assert code == 220, (code, text)
        return client

    async def reply(self, timeout: float = 5.0) -> tuple[int, str]:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise ConnectionError("connection closed; got so far: " + " | ".join(lines))
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text[4:])
            if len(text) < 4 or text[3] != "-":
                return int(text[:3]), "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str) -> tuple[int, str]:
        await self.send(line.encode() + b"\r\n")
        return await self.reply()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()
