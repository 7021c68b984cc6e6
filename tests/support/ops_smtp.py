"""A recording SMTP server on 127.0.0.1:0 standing in for the relayd daemon.

It runs aiosmtpd's SMTP protocol on its own event loop in a background thread, so blocking
callers (the sendmail command in a subprocess, PHP) can talk to it. Replies can be scripted:
``rcpt_reply``/``data_reply`` set to e.g. ``"450 4.2.0 try later"``.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]


@dataclass
class Recorder:
    messages: list[Received] = field(default_factory=list)
    rcpt_reply: str | None = None
    data_reply: str | None = None
    arrived: threading.Event = field(default_factory=threading.Event)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_reply:
            return self.data_reply
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                      envelope.original_content, list(envelope.mail_options)))
        self.arrived.set()
        return f"250 2.0.0 Ok: queued as TESTID{len(self.messages)}"


class RecordingServer:
    """``with RecordingServer() as srv: srv.port``; ``srv.recorder.messages`` afterwards."""

    def __init__(self) -> None:
        self.recorder = Recorder()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> RecordingServer:
        self._thread.start()

        async def start() -> asyncio.Server:
            return await self._loop.create_server(
                lambda: SMTP(self.recorder, hostname="daemon.test", decode_data=False,
                             enable_SMTPUTF8=True),
                "127.0.0.1", 0)

        self._server = asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
