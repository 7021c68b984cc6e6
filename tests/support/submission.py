"""A relayd with a submission listener, as an operator sets one up: a certificate from a CA,
`relayd user add`, `relayd run`. Clients are real: smtplib, swaks, PHP."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl
from pathlib import Path
from typing import Any

import trustme

from tests.support.operator import Operator, Result
from tests.support.relay import free_port
from tests.support.waiting import wait_until

PASSWORD = "s3cret-pass word"
# What relayd logs once its submission listeners are bound (relayd/daemon/accepting.py).
LISTENING = "submission (TLS and AUTH required) on "
MESSAGE = (b"From: App <app@example.com>\r\nTo: user@example.net\r\nSubject: report\r\n\r\n"
           b"body\r\n")


class Certs:
    """A test CA and the listener's certificate files (re-issued for renewal tests)."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.cert_file = directory / "fullchain.pem"
        self.key_file = directory / "privkey.pem"
        self.issue("first")

    def issue(self, name: str) -> None:
        cert = self.ca.issue_cert("127.0.0.1", "localhost", common_name=name)
        cert.private_key_pem.write_to_path(str(self.key_file))
        cert.private_key_and_cert_chain_pem.write_to_path(str(self.cert_file))

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


class Submission:
    """One relayd with a STARTTLS (587-style) and an implicit-TLS (465-style) listener."""

    def __init__(self, tmp_path: Path, **extra: Any) -> None:
        self.tmp = tmp_path
        self.certs = Certs(tmp_path)
        self.starttls_port = free_port()
        self.implicit_port = free_port()
        self.outbox = tmp_path / "outbox"
        listener = {"cert_file": str(self.certs.cert_file), "key_file": str(self.certs.key_file),
                    "allowed_clients": ["127.0.0.0/8"], "auth_failure_delay": "100ms",
                    "auth_failure_limit": 3, "auth_failure_window": "1m", "auth_lockout": "1m"}
        listener.update(extra.pop("listener", {}))
        self.users_file = tmp_path / "users.yaml"
        smarthosts = [{"name": "box", "outbox": str(self.outbox)}, *extra.pop("smarthosts", [])]
        self.op = Operator(
            tmp_path, smarthosts,
            submission=[{"listen": f"127.0.0.1:{self.starttls_port}", "tls": "starttls", **listener},
                        {"listen": f"127.0.0.1:{self.implicit_port}", "tls": "implicit", **listener}],
            users_file=str(self.users_file), **extra)

    async def start(self) -> None:
        """``relayd run``, until the submission listeners accept too. ``Operator.start``
        returns once relayd greets on its own listener, and relayd binds the submission
        listeners only after that one: wait for the line it logs when they are bound."""
        before = self.op.log().count(LISTENING)
        await self.op.start()
        await wait_until(lambda: self.op.log().count(LISTENING) > before, 15,
                         lambda: f"the submission listeners; log: {self.op.log()[-2000:]}")

    async def add_user(self, name: str, *args: str, password: str = PASSWORD) -> Result:
        result = await self.op.cli("user", "add", name, *args, stdin=password + "\n")
        assert result.code == 0, result.err
        return result

    def smtp(self, *, login: tuple[str, str] | None = (("alice", PASSWORD))) -> smtplib.SMTP:
        """A session on the STARTTLS port, after STARTTLS (and AUTH LOGIN or PLAIN)."""
        s = smtplib.SMTP("127.0.0.1", self.starttls_port, timeout=10)
        s.ehlo("app.test")
        s.starttls(context=self.certs.client_context())
        s.ehlo("app.test")
        if login is not None:
            s.login(*login)
        return s

    def smtps(self) -> smtplib.SMTP_SSL:
        return smtplib.SMTP_SSL("127.0.0.1", self.implicit_port, timeout=10,
                                context=self.certs.client_context())

    def tls_socket(self, port: int | None = None) -> ssl.SSLSocket:
        """A raw implicit-TLS socket, greeting and EHLO read (for the hostile-input pass)."""
        raw = socket.create_connection(("127.0.0.1", port or self.implicit_port), timeout=10)
        sock = self.certs.client_context().wrap_socket(raw, server_hostname="127.0.0.1")
        read_reply(sock)
        sock.sendall(b"EHLO hostile.test\r\n")
        read_reply(sock)
        return sock

    async def in_thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)


def read_reply(sock: socket.socket) -> str:
    """One complete (possibly multi-line) SMTP reply."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data.decode(errors="replace")
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) > 1 and len(lines[-2]) >= 4 and lines[-2][3:4] == b" " and data.endswith(b"\r\n"):
            return data.decode(errors="replace")


def replies_until_closed(sock: socket.socket) -> list[str]:
    """Every reply the server sends until it closes the connection, one string each (the
    lines of a multi-line reply joined with "\\n"): for counting what a session answered."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ssl.SSLEOFError, ConnectionResetError):
            break  # closed without TLS close_notify, or reset after QUIT: the end all the same
        if not chunk:
            break
        data += chunk
    replies: list[str] = []
    lines: list[str] = []
    for line in data.decode(errors="replace").split("\r\n")[:-1]:
        lines.append(line)
        if line[3:4] != "-":
            replies.append("\n".join(lines))
            lines = []
    if lines:
        replies.append("\n".join(lines))  # an unfinished reply is shown too
    return replies
