"""A tiny aiosmtpd upstream that checks AUTH XOAUTH2 and can reject tokens like Gmail does.

A rejected token gets ``334 <base64 JSON>`` (Google's error challenge); the client must answer
with an empty line and then gets ``535``. Tokens in ``valid`` pass; every SASL string seen is
recorded, decoded.
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult

GOOGLE_ERROR = {"status": "401", "schemes": "bearer", "scope": "https://mail.google.com/"}


@dataclass
class XOAuth2Handler:
    username: str
    valid: set[str] = field(default_factory=set)
    seen: list[str] = field(default_factory=list)          # decoded SASL strings
    empty_answers: int = 0

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) < 2:
            return AuthResult(success=False, handled=False)
        sasl = base64.b64decode(args[1]).decode()
        self.seen.append(sasl)
        prefix, bearer = f"user={self.username}\x01auth=Bearer ", "\x01\x01"
        token = sasl[len(prefix):-len(bearer)] if sasl.startswith(prefix) and sasl.endswith(bearer) else None
        if token is not None and token in self.valid:
            return AuthResult(success=True, auth_data=self.username)
        answer = await server.challenge_auth(json.dumps(GOOGLE_ERROR))
        if answer == b"":
            self.empty_answers += 1
        return AuthResult(success=False, handled=False,
                          message="535 5.7.8 Username and Password not accepted")

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 2.0.0 OK"


async def start_upstream(handler: XOAuth2Handler) -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="upstream.test", auth_require_tls=False), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, port
