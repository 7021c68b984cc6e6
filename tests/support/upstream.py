"""A fake upstream SMTP server (smarthost) for tests: records everything and can be scripted.

Runs aiosmtpd on 127.0.0.1, port 0, on the test's own event loop (no thread). Usage::

    async with FakeUpstream(tls="starttls", auth=("PLAIN", "LOGIN"),
                            credentials={"user": "pw"}) as up:
        smarthost = up.smarthost(name="primary", auth=AuthConfig(...))   # ca_file set for you
        ...                                             # deliver to up.host / up.port
        assert up.messages[0].data == b"..."            # exact bytes after un-dot-stuffing

Constructor options (all also plain attributes, so a test may change them between messages):

- ``tls``: ``"none"`` | ``"starttls"`` (offers STARTTLS) | ``"implicit"`` (TLS from the first
  byte). Certificates come from a ``trustme`` CA for ``hostname`` ("localhost" and 127.0.0.1);
  ``up.ca_file`` is the CA to trust, ``up.other_ca_file`` a CA that did NOT sign it.
  ``expired``: the certificate served expired yesterday (same CA, same names).
  ``tls_versions``: (minimum, maximum) ``ssl.TLSVersion`` the server negotiates, e.g.
  ``tls_versions.LEGACY`` for a server that only speaks TLS 1.0 and 1.1 (tests/support/tls_versions.py).
- ``require_starttls``: commands other than EHLO/STARTTLS/QUIT get ``530 5.7.0 Must issue a
  STARTTLS command first`` before TLS (with ``tls="starttls"``).
- ``auth``: mechanisms offered, any of ``PLAIN LOGIN CRAM-MD5 XOAUTH2`` (empty: no AUTH).
  ``credentials``: ``{user: password}``; ``tokens``: valid XOAUTH2 access tokens.
  ``require_auth``: MAIL before AUTH gets ``530 5.7.0 Authentication required``.
  ``refuse_plain``: answer ``AUTH PLAIN`` with ``504 5.7.4 Unrecognized authentication type``
  although PLAIN is advertised (Office 365). ``xoauth2_style``: ``"google"`` rejects a bad token
  with ``334 <base64 JSON>`` and, after the client's empty line, ``535 5.7.8``; ``"microsoft"``
  answers ``535 5.7.3 Authentication unsuccessful`` at once. ``auth_failure``: the reply to
  wrong credentials (default ``535 5.7.8 Authentication credentials invalid``; e.g.
  ``535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled``).
- ``replies``: scripted replies per stage: keys ``greeting`` (non-220 only; the server closes
  afterwards), ``ehlo``, ``mail``, ``data`` (the reply to the DATA command), ``dot`` (the reply
  after the final dot), ``rset``. A value is a reply line (``"451 4.3.0 try later"``) or a list
  of lines used one per occurrence (then the default behaviour). ``rcpt``: ``{address: reply}``
  (value a line or a list, as above); ``dot`` may also be such a mapping, keyed by the
  message's first recipient.
- ``drop_at`` / ``hang_at``: a stage name (above, plus ``rcpt`` and ``body``; ``body`` means
  "after 354, while the client sends the message"; ``starttls`` means "after answering 220 to
  STARTTLS", so ``hang_at="starttls"`` never takes part in the TLS handshake; ``auth``: at the
  AUTH command) at which the server closes the connection / stops answering forever.
  ``drop_once``: only the first time, then behave normally.
- ``size_limit``: the advertised SIZE (0: no SIZE). ``smtputf8``: offer SMTPUTF8. ``port``: the port
  to listen on (0: any free one; a fixed one lets a test start the server after relayd tried it).
  ``reissue(hostname, expired=False)`` serves a new certificate (for another name, or no longer
  expired) from then on; ``serve_tls_versions(versions)`` changes ``tls_versions`` from then on.
- ``eightbitmime``: advertise 8BITMIME (RFC 6152; default True, as aiosmtpd does). False
  makes a 7-bit server, for the conversion relayd then owes it; the bytes received are
  recorded as they came.
- ``pipelining``: advertise PIPELINING (RFC 2920) in the EHLO reply, as real smarthosts do
  (default True; aiosmtpd reads pipelined commands either way). A scripted ``data`` reply starting with ``354`` is followed by a real
  read of the message up to the final dot (recorded in ``forced_data``), then the ``dot``
  script or ``554 5.5.1 no valid recipients``.

Recorded: ``messages`` (``Received``: mail_from, rcpt_tos, data, mail_options,
rcpt_options, tls, auth_mechanism, auth_login, connection), ``auth_attempts`` (``AuthAttempt``:
mechanism, login, secret, ok, connection), ``connections`` (number accepted),
``commands`` (every command line as received, AUTH payloads included: for asserting what
was sent, including "nothing in clear text"), ``max_concurrent`` (peak open sessions),
``waiting_at_mail`` (for each MAIL, the command lines that had already arrived, unread, when
the server began to handle it, before it replied: a pipelined group's RCPTs and DATA),
``forced_data`` (see ``pipelining``).
``await up.wait_connections(n)`` waits (with a deadline) until n sessions were opened.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import json
import ssl
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from relayd.config.schema import AuthConfig, Smarthost, TlsMode
from tests.support.tls_versions import limit_versions

Script = str | list[str]
STAGES = ("greeting", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "body", "dot", "rset")


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]
    rcpt_options: list[str]
    tls: bool
    auth_mechanism: str | None
    auth_login: str | None
    connection: int
    at: float = field(default_factory=time.time)  # when the final dot was accepted


@dataclass
class AuthAttempt:
    mechanism: str
    login: str | None
    secret: str | None
    ok: bool
    connection: int


@dataclass
class _ConnState:
    index: int
    auth_mechanism: str | None = None
    auth_login: str | None = None


def _make_ca_files(directory: Path, hostname: str) -> tuple[trustme.CA, Path, Path]:
    ca = trustme.CA()
    other = trustme.CA()
    ca_file = directory / "ca.pem"
    other_file = directory / "other-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    other.cert_pem.write_to_path(str(other_file))
    return ca, ca_file, other_file


class FakeUpstream:
    """The scriptable, recording fake smarthost (see module docstring)."""

    def __init__(self, *, tls: str = "none", require_starttls: bool = False,
                 auth: Sequence[str] = (), credentials: Mapping[str, str] | None = None,
                 tokens: Sequence[str] = (), require_auth: bool = False, refuse_plain: bool = False,
                 xoauth2_style: str = "google",
                 auth_failure: str = "535 5.7.8 Authentication credentials invalid", replies: Mapping[str, Any] | None = None,
                 drop_at: str | None = None, hang_at: str | None = None, drop_once: bool = False,
                 size_limit: int = 0, smtputf8: bool = True, pipelining: bool = True,
                 eightbitmime: bool = True, hostname: str = "localhost", port: int = 0,
                 expired: bool = False,
                 tls_versions: tuple[ssl.TLSVersion, ssl.TLSVersion] | None = None) -> None:
        self.tls = tls
        self.require_starttls = require_starttls
        self.auth = tuple(m.upper() for m in auth)
        self.credentials = dict(credentials or {})
        self.tokens = set(tokens)
        self.require_auth = require_auth
        self.refuse_plain = refuse_plain
        self.xoauth2_style = xoauth2_style
        self.auth_failure = auth_failure
        self.replies: dict[str, Any] = {k: (list(v) if isinstance(v, list) else v)
                                        for k, v in (replies or {}).items()}
        self.drop_at = drop_at
        self.hang_at = hang_at
        self.drop_once = drop_once
        self.size_limit = size_limit
        self.smtputf8 = smtputf8
        self.pipelining = pipelining
        self.eightbitmime = eightbitmime
        self.hostname = hostname
        self.host = "127.0.0.1"
        self.port = port  # 0: any free port
        self.messages: list[Received] = []
        self.auth_attempts: list[AuthAttempt] = []
        self.commands: list[str] = []
        self.waiting_at_mail: list[list[str]] = []
        self.forced_data: list[bytes] = []
        self.connections = 0
        self.open_sessions = 0
        self.max_concurrent = 0
        self._tmp = tempfile.TemporaryDirectory(prefix="fake-upstream-")
        self.ca, self.ca_file, self.other_ca_file = _make_ca_files(Path(self._tmp.name), hostname)
        self._server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.reissue(hostname, expired=expired)
        if tls_versions is not None:
            self.serve_tls_versions(tls_versions)
        self._server: asyncio.AbstractServer | None = None
        self._protocols: set[_ScriptedSMTP] = set()
        self._changed = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> FakeUpstream:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ScriptedSMTP(self), host=self.host, port=self.port,
            ssl=self._server_ctx if self.tls == "implicit" else None)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for proto in list(self._protocols):
                if proto.transport is not None:
                    proto.transport.abort()
            await self._server.wait_closed()
            self._server = None
        self._tmp.cleanup()

    async def __aenter__(self) -> FakeUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def reissue(self, hostname: str, *, expired: bool = False) -> None:
        """Serve a certificate for ``hostname`` (and 127.0.0.1) from the same CA from now on;
        ``expired``: one whose validity ended yesterday."""
        validity: dict[str, datetime.datetime] = {}
        if expired:
            now = datetime.datetime.now(datetime.UTC)
            validity = {"not_before": now - datetime.timedelta(days=90),
                        "not_after": now - datetime.timedelta(days=1)}
        self.ca.issue_cert(hostname, "127.0.0.1", **validity).configure_cert(self._server_ctx)

    def serve_tls_versions(self, versions: tuple[ssl.TLSVersion, ssl.TLSVersion]) -> None:
        """Negotiate only TLS versions (minimum, maximum) in the handshakes from now on."""
        limit_versions(self._server_ctx, versions)

    def smarthost(self, *, name: str = "fake", auth: AuthConfig | None = None,
                  timeout: float = 2.0, max_connections: int = 4, **overrides: Any) -> Smarthost:
        """A ``Smarthost`` pointing here, with the matching TLS mode and this CA as ``ca_file``."""
        mode = {"none": TlsMode.NONE, "starttls": TlsMode.STARTTLS,
                "implicit": TlsMode.IMPLICIT}[self.tls]
        values: dict[str, Any] = dict(name=name, host=self.host, port=self.port, tls=mode,
                                      ca_file=self.ca_file, timeout=timeout,
                                      max_connections=max_connections,
                                      auth=auth or AuthConfig())
        values.update(overrides)
        return Smarthost(**values)

    async def wait_connections(self, n: int, timeout: float = 5.0) -> None:
        async def until() -> None:
            while self.connections < n:
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(until(), timeout)

    # -- helpers for the protocol -----------------------------------------------------------

    def next_reply(self, stage: str, key: str | None = None) -> str | None:
        script = self.replies.get(stage)
        if key is not None:
            script = script.get(key) if isinstance(script, dict) else None
        if isinstance(script, list):
            return script.pop(0) if script else None
        return script if isinstance(script, str) else None

    def action(self, stage: str) -> str | None:
        if self.hang_at == stage:
            return "hang"
        if self.drop_at == stage:
            if self.drop_once:
                self.drop_at = None
            return "drop"
        return None

    def _note_open(self, delta: int) -> None:
        self.open_sessions += delta
        self.max_concurrent = max(self.max_concurrent, self.open_sessions)
        self._changed.set()


class Upstreams:
    """Makes ``FakeUpstream``s for one test and stops every one at its end (the ``upstream``
    fixture): ``await upstream(tls="starttls", ...)`` returns one that is listening;
    ``listening=False`` leaves it to the test to ``start()`` it (connection refused until then)."""

    def __init__(self) -> None:
        self.made: list[FakeUpstream] = []

    async def __call__(self, *, listening: bool = True, **options: Any) -> FakeUpstream:
        up = FakeUpstream(**options)
        self.made.append(up)
        if listening:
            await up.start()
        return up

    async def stop(self) -> None:
        for up in reversed(self.made):
            await up.stop()


def _address(arg: str) -> str:
    start, end = arg.find("<"), arg.find(">")
    return arg[start + 1:end] if 0 <= start < end else arg.split(":", 1)[-1].strip()


class _ScriptedSMTP(SMTP):  # type: ignore[misc]
    def __init__(self, fake: FakeUpstream) -> None:
        self.fake = fake
        fake.connections += 1
        self.conn = _ConnState(index=fake.connections)
        offered = set(fake.auth)
        exclude = [m for m in ("PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2") if m not in offered]
        super().__init__(
            _Handler(fake, self), hostname=fake.hostname, decode_data=False,
            enable_SMTPUTF8=fake.smtputf8, data_size_limit=fake.size_limit or None,
            tls_context=fake._server_ctx if fake.tls == "starttls" else None,
            require_starttls=fake.require_starttls, auth_require_tls=False,
            auth_exclude_mechanism=exclude, ident="fake-upstream")

    # connection bookkeeping
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            self.fake._protocols.add(self)
            self.fake._note_open(+1)

    def connection_lost(self, error: Exception | None) -> None:
        if self in self.fake._protocols:
            self.fake._protocols.discard(self)
            self.fake._note_open(-1)
        super().connection_lost(error)

    def is_tls(self) -> bool:
        return self._tls_protocol is not None or (
            self.transport is not None and self.transport.get_extra_info("ssl_object") is not None)

    async def _act(self, stage: str) -> bool:
        """Drop or hang at ``stage``; True when the caller must not go on."""
        action = self.fake.action(stage)
        if action == "drop":
            if self.transport is not None:
                self.transport.abort()
            return True
        if action == "hang":
            await asyncio.Event().wait()  # cancelled when the connection goes away
        return False

    async def _scripted(self, stage: str, key: str | None = None) -> bool:
        if await self._act(stage):
            return True
        reply = self.fake.next_reply(stage, key)
        if reply is None:
            return False
        await self.push(reply)
        return True

    async def _handle_client(self) -> None:
        if await self._act("greeting"):
            return
        greeting = self.fake.next_reply("greeting")
        if greeting is not None:
            await self.push(greeting)
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    async def smtp_EHLO(self, arg: str) -> None:
        self.fake.commands.append(f"EHLO {arg}")
        if not await self._scripted("ehlo"):
            await super().smtp_EHLO(arg)

    async def smtp_HELO(self, arg: str) -> None:
        self.fake.commands.append(f"HELO {arg}")
        await super().smtp_HELO(arg)

    async def smtp_STARTTLS(self, arg: str) -> None:
        self.fake.commands.append("STARTTLS")
        if self.tls_context is not None and "starttls" in (self.fake.hang_at, self.fake.drop_at):
            await self.push("220 Ready to start TLS")
            await self._act("starttls")  # the handshake never happens
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_AUTH(self, arg: str) -> None:
        if "auth" in (self.fake.hang_at, self.fake.drop_at):
            self.fake.commands.append(f"AUTH {arg.split(' ', 1)[0]}")  # the mechanism only
            await self._act("auth")
            return
        await super().smtp_AUTH(arg)

    async def smtp_MAIL(self, arg: str) -> None:
        self.fake.commands.append(f"MAIL {arg}")
        unread = bytes(self._reader._buffer)
        self.fake.waiting_at_mail.append([ln.decode() for ln in unread.split(b"\r\n") if ln])
        if await self._scripted("mail"):
            return
        if (self.fake.require_auth and not self.session.authenticated
                and not (self.fake.require_starttls and not self.is_tls())):
            await self.push("530 5.7.0 Authentication required")
            return
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str) -> None:
        self.fake.commands.append(f"RCPT {arg}")
        if await self._act("rcpt"):
            return
        if self.envelope.mail_from is not None and arg:
            reply = self.fake.next_reply("rcpt", _address(arg))
            if reply is not None:
                await self.push(reply)
                return
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        self.fake.commands.append("DATA")
        if await self._act("data"):
            return
        reply = self.fake.next_reply("data")
        if reply is not None and reply.startswith("354"):
            await self._forced_data(reply)
            return
        if reply is not None:
            await self.push(reply)
            return
        if self.fake.drop_at == "body" or self.fake.hang_at == "body":
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            await self._act("body")
            return
        await super().smtp_DATA(arg)

    async def _forced_data(self, reply: str) -> None:
        """354 whatever the state (a broken server): read up to the final dot, record it."""
        await self.push(reply)
        data = b""
        while True:
            line = await self._reader.readuntil(b"\r\n")
            if line == b".\r\n":
                break
            data += line
        self.fake.forced_data.append(data)
        await self.push(self.fake.next_reply("dot") or "554 5.5.1 no valid recipients")

    async def smtp_RSET(self, arg: str) -> None:
        self.fake.commands.append("RSET")
        if not await self._scripted("rset"):
            await super().smtp_RSET(arg)

    async def smtp_NOOP(self, arg: str) -> None:
        self.fake.commands.append("NOOP")
        await super().smtp_NOOP(arg)

    async def smtp_QUIT(self, arg: str) -> None:
        self.fake.commands.append("QUIT")
        await super().smtp_QUIT(arg)

    # -- AUTH mechanisms (aiosmtpd looks up auth_<NAME>, "__" standing for "-") --------------

    def _attempt(self, mech: str, login: str | None, secret: str | None, ok: bool) -> AuthResult:
        self.fake.auth_attempts.append(AuthAttempt(mech, login, secret, ok, self.conn.index))
        if ok:
            self.conn.auth_mechanism, self.conn.auth_login = mech, login
            return AuthResult(success=True, auth_data=login)
        return AuthResult(success=False, handled=False, message=self.fake.auth_failure)

    def _valid(self, login: str | None, password: str | None) -> bool:
        return login is not None and self.fake.credentials.get(login) == password

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult | None:
        self.fake.commands.append(" ".join(args))
        if self.fake.refuse_plain:
            await self.push("504 5.7.4 Unrecognized authentication type")
            return None
        if len(args) == 2:
            blob = base64.b64decode(args[1])
        else:
            raw = await self.challenge_auth("", encode_to_b64=False)
            if not isinstance(raw, bytes):
                return None
            blob = raw
        parts = blob.split(b"\0")
        if len(parts) != 3:
            return self._attempt("PLAIN", None, None, False)
        login, password = parts[1].decode(), parts[2].decode()
        return self._attempt("PLAIN", login, password, self._valid(login, password))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult | None:
        self.fake.commands.append(" ".join(args))
        if len(args) == 2:
            login_b: Any = base64.b64decode(args[1])
        else:
            login_b = await self.challenge_auth("Username:")
        if not isinstance(login_b, bytes):
            return None
        password_b = await self.challenge_auth("Password:")
        if not isinstance(password_b, bytes):
            return None
        login, password = login_b.decode(), password_b.decode()
        return self._attempt("LOGIN", login, password, self._valid(login, password))

    async def auth_CRAM__MD5(self, _: Any, args: list[str]) -> AuthResult | None:
        self.fake.commands.append(" ".join(args))
        challenge = f"<{self.conn.index}.4242@{self.fake.hostname}>".encode()
        answer = await self.challenge_auth(challenge)
        if not isinstance(answer, bytes) or b" " not in answer:
            return None if not isinstance(answer, bytes) else self._attempt("CRAM-MD5", None, None, False)
        login_b, digest = answer.rsplit(b" ", 1)
        login = login_b.decode()
        password = self.fake.credentials.get(login)
        ok = password is not None and hmac.compare_digest(
            hmac.new(password.encode(), challenge, hashlib.md5).hexdigest().encode(), digest)
        return self._attempt("CRAM-MD5", login, digest.decode(), ok)

    async def auth_XOAUTH2(self, _: Any, args: list[str]) -> AuthResult | None:
        self.fake.commands.append(" ".join(args))
        if len(args) != 2:
            return self._attempt("XOAUTH2", None, None, False)
        fields = base64.b64decode(args[1]).decode().split("\x01")
        login = next((f[5:] for f in fields if f.startswith("user=")), None)
        token = next((f[12:] for f in fields if f.startswith("auth=Bearer ")), None)
        if token in self.fake.tokens:
            return self._attempt("XOAUTH2", login, token, True)
        self.fake.auth_attempts.append(AuthAttempt("XOAUTH2", login, token, False, self.conn.index))
        if self.fake.xoauth2_style == "google":
            error = json.dumps({"status": "401", "schemes": "Bearer",
                                "scope": "https://mail.google.com/"}).encode()
            await self.challenge_auth(error)  # the client answers with an empty line
            await self.push("535-5.7.8 Username and Password not accepted.\r\n"
                            "535 5.7.8 https://support.google.com/mail/?p=BadCredentials")
        else:
            await self.push("535 5.7.3 Authentication unsuccessful")
        return None


class _Handler:
    def __init__(self, fake: FakeUpstream, proto: _ScriptedSMTP) -> None:
        self.fake = fake
        self.proto = proto

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        # aiosmtpd advertises a bare "AUTH" when every mechanism is excluded; real servers don't.
        lines = [r for r in responses if r.strip() != "250-AUTH"
                 and (self.fake.eightbitmime or r[4:].strip().upper() != "8BITMIME")]
        if self.fake.pipelining:
            lines.insert(1, "250-PIPELINING")
        return lines

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str | None:
        if await self.proto._act("dot"):
            return None
        per_rcpt = isinstance(self.fake.replies.get("dot"), dict)
        reply = self.fake.next_reply("dot", envelope.rcpt_tos[0] if per_rcpt else None)
        if reply is not None and not reply.startswith("2"):
            return reply
        self.fake.messages.append(Received(
            mail_from="" if envelope.mail_from == "<>" else envelope.mail_from, rcpt_tos=list(envelope.rcpt_tos),
            data=bytes(envelope.original_content or b""),
            mail_options=list(envelope.mail_options), rcpt_options=list(envelope.rcpt_options),
            tls=self.proto.is_tls(), auth_mechanism=self.proto.conn.auth_mechanism,
            auth_login=self.proto.conn.auth_login, connection=self.proto.conn.index))
        return reply or f"250 2.0.0 Ok: queued as M{len(self.fake.messages)}"
