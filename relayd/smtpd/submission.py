"""The submission listeners: SMTP from other hosts, with TLS and AUTH, for the users file's users.

One ``SubmissionListener`` per ``submission:`` entry, built on the loopback listener's
``RelaySMTP`` / ``RelayHandler`` (same limits, line framing, DATA reader and Acceptor) with:

- TLS: STARTTLS on 587 (RFC 3207) or implicit TLS on 465 (RFC 8314 §3.3), the certificate
  swapped on SIGHUP (relayd/smtpd/tls.py);
- AUTH PLAIN and LOGIN (RFC 4954, RFC 4616), offered and accepted only once the session is
  encrypted (538 5.7.11 before: RFC 4954 §4 and §6), always required (530 5.7.0 for MAIL);
  the scrypt check runs in a worker thread, never on the event loop;
- brute-force protection (relayd/smtpd/guard.py): each failure is answered after a delay,
  and too many from one address get 421 4.7.0;
- sender authorization (relayd/users/authorize.py): MAIL FROM and the header From must be
  the user's (553 5.7.1); the user and mechanism travel with the message into the spool.

Passwords never reach a log line, a reply or an exception text.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from relayd.config.schema import Config, SubmissionListener, TlsMode
from relayd.control.metrics import Recorder
from relayd.errors import ConfigError
from relayd.smtpd.guard import AuthGuard
from relayd.smtpd.lines import BARE_LINE_ENDING_REPLY, BareLineEnding
from relayd.smtpd.listener import Acceptor, Listener, ListenerSettings, RelayHandler, RelaySMTP
from relayd.smtpd.tls import ServerTls
from relayd.users import authorize
from relayd.users.store import User, UsersFile

log = logging.getLogger("relayd.submission")

# RFC 4954 §4: a line of the AUTH exchange may be up to 12288 octets.
MAX_AUTH_LINE = 12288
MECHANISMS = ("LOGIN", "PLAIN")
R_ENCRYPTION = "538 5.7.11 Encryption required for requested authentication mechanism"
R_INVALID = "535 5.7.8 Authentication credentials invalid"
R_OK = "235 2.7.0 Authentication successful"
R_ABORTED = "501 5.7.0 Authentication aborted"
R_BASE64 = "501 5.5.2 Cannot decode base64"
R_TOO_LONG = "500 5.5.6 Authentication exchange line is too long"


class _Failed(Exception):
    """The AUTH exchange ended without credentials; ``reply`` says why."""

    def __init__(self, reply: str, *, counts: bool) -> None:
        super().__init__(reply)
        self.reply = reply
        self.counts = counts  # a malformed exchange counts as a failed attempt; "*" does not


class SubmissionSMTP(RelaySMTP):
    """A RelaySMTP session that requires AUTH, and offers it only under TLS."""

    def __init__(self, handler: SubmissionHandler, **kwargs: Any) -> None:
        super().__init__(handler, auth_required=True, auth_require_tls=True, **kwargs)
        self._submission = handler
        self.user: User | None = None
        self.mechanism = ""

    def encrypted(self) -> bool:
        """True under STARTTLS or on an implicit-TLS port."""
        if self._tls_protocol is not None:
            return True
        return self.transport is not None and \
            self.transport.get_extra_info("ssl_object") is not None

    def _client(self) -> str:
        peer = self.session.peer if self.session is not None else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"

    async def smtp_AUTH(self, arg: str) -> None:
        if await self.check_helo_needed("EHLO"):
            return
        assert self.session is not None
        guard, client = self._submission.guard, self._client()
        if not self.session.extended_smtp:
            await self.push("503 5.5.1 Error: send EHLO first")
        elif not self.encrypted():
            await self.push(R_ENCRYPTION)
        elif self.session.authenticated:
            await self.push("503 5.5.1 Error: already authenticated")
        elif guard.locked(client, time.monotonic()):
            await self._lock_out(client)
        else:
            await self._login(arg or "", client)

    async def _login(self, arg: str, client: str) -> None:
        words = arg.split()
        if not words or len(words) > 2:
            await self.push("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        mechanism = words[0].upper()
        if mechanism not in MECHANISMS:
            await self.push("504 5.5.4 Unrecognized authentication type")
            return
        initial = words[1] if len(words) == 2 else None
        try:
            login, password = await self._exchange(mechanism, initial)
        except _Failed as exc:
            if exc.counts:
                await self._failed(client, mechanism, None, "malformed")
                if self.transport is None or self.transport.is_closing():
                    return
            await self.push(exc.reply)
            return
        user = await self._submission.verify(login, password)
        del password
        if user is None:
            await self._failed(client, mechanism, login, "failure")
            if self.transport is not None and not self.transport.is_closing():
                await self.push(R_INVALID)
            return
        assert self.session is not None
        self.session.authenticated = True
        self.user, self.mechanism = user, mechanism
        self._submission.metrics.auth("success")
        log.info("[%s]: authenticated as %s (mechanism %s)", client, user.name, mechanism)
        await self.push(R_OK)

    async def _failed(self, client: str, mechanism: str, login: bytes | None, result: str) -> None:
        """Count the failure, wait, and lock the client out after too many."""
        sub = self._submission
        left = sub.guard.failed(client, time.monotonic())
        sub.metrics.auth(result)
        name = _printable(login) if login is not None else "-"
        log.warning("[%s]: authentication failed (%s, mechanism %s) for user %s; %s", client,
                    "malformed exchange" if result == "malformed" else "bad credentials",
                    mechanism, name,
                    "now locked out" if left == 0 else f"{left} more before a lockout")
        # The delay slows a password guesser down to a few tries a second per connection.
        await asyncio.sleep(sub.settings_sub.auth_failure_delay)
        if left == 0:
            await self._lock_out(client)

    async def _lock_out(self, client: str) -> None:
        self._submission.metrics.auth("locked_out")
        log.warning("[%s]: locked out: too many failed authentication attempts from this "
                    "address", client)
        await self.push("421 4.7.0 Too many failed authentication attempts, try again later")
        if self.transport is not None:
            self.transport.close()

    async def _exchange(self, mechanism: str, initial: str | None) -> tuple[bytes, bytes]:
        """(login, password) from the client, per RFC 4616 (PLAIN) or the LOGIN draft."""
        if mechanism == "PLAIN":
            blob = _decode(initial) if initial is not None else await self._challenge(b"")
            parts = blob.split(b"\x00")
            if len(parts) != 3:
                raise _Failed("501 5.5.2 Cannot split the PLAIN response", counts=True)
            authzid, login, password = parts
            if authzid and authzid != login:
                # Acting for another identity is not offered (RFC 4616 §2): refused like a
                # wrong password, after the same work.
                return b"\x00", password
            return login, password
        login = _decode(initial) if initial is not None else await self._challenge(b"Username:")
        password = await self._challenge(b"Password:")
        return login, password

    async def _challenge(self, text: bytes) -> bytes:
        """Send a 334 challenge; the client's decoded response (RFC 4954 §4)."""
        await self.push(b"334 " + base64.b64encode(text))
        line = await self._read_auth_line()
        return _decode(line)

    async def _read_auth_line(self) -> str:
        reader = self._reader
        try:
            raw = await reader.readuntil()
        except BareLineEnding:
            raise _Failed(BARE_LINE_ENDING_REPLY, counts=True) from None
        except asyncio.LimitOverrunError as exc:
            await reader.readexactly(exc.consumed)
            while True:  # drop the rest of the overlong line
                try:
                    await reader.readuntil()
                    break
                except asyncio.LimitOverrunError as more:
                    await reader.readexactly(more.consumed)
                except BareLineEnding:
                    break
            raise _Failed(R_TOO_LONG, counts=True) from None
        self._reset_timeout()
        if len(raw) > MAX_AUTH_LINE + 2:
            raise _Failed(R_TOO_LONG, counts=True)
        return raw[:-2].decode("ascii", "replace")


def _decode(text: str) -> bytes:
    """One base64 response; "*" cancels (RFC 4954 §4), "=" is an empty initial response."""
    text = text.strip()
    if text == "*":
        raise _Failed(R_ABORTED, counts=False)
    if text == "=":
        return b""
    try:
        return base64.b64decode(text.encode("ascii", "replace"), validate=True)
    except (binascii.Error, ValueError):
        raise _Failed(R_BASE64, counts=True) from None


def _printable(login: bytes) -> str:
    """A login as it may appear in the log: printable, short (never the password)."""
    text = login.decode("utf-8", "replace")
    clean = "".join(c if c.isprintable() and c not in " \\" else "?" for c in text)
    return clean[:64] or "-"


class SubmissionHandler(RelayHandler):
    """RelayHandler hooks plus AUTH verification and the user's sender authorization."""

    def __init__(self, settings: ListenerSettings, acceptor: Acceptor, *,
                 listener: SubmissionListener, users: UsersFile, verify_executor: Executor,
                 metrics: Recorder) -> None:
        super().__init__(settings, acceptor)
        self.settings_sub = listener
        self.users = users
        self.metrics = metrics
        self.guard = AuthGuard(limit=listener.auth_failure_limit,
                               window=listener.auth_failure_window, lockout=listener.auth_lockout)
        self._executor = verify_executor

    async def verify(self, login: bytes, password: bytes) -> User | None:
        """The user, or None: the users file re-read if it changed, and the scrypt work, in
        a worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._verify, login, password)

    def _verify(self, login: bytes, password: bytes) -> User | None:
        refresh_users(self.users)
        return self.users.verify(login, password)

    def on_connect(self, peer: Any) -> str | None:
        refusal = super().on_connect(peer)
        if refusal is None and isinstance(peer, tuple) and peer \
                and self.guard.locked(str(peer[0]), time.monotonic()):
            log.warning("reject: connect from [%s]: locked out after failed AUTH", peer[0])
            return f"421 4.7.0 {self.settings.hostname} too many failed authentication attempts"
        return refusal

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: SmtpEnvelope,
                          hostname: str, responses: list[str]) -> list[str]:
        responses = await super().handle_EHLO(server, session, envelope, hostname, responses)
        responses = [r for r in responses if not r[4:].startswith("AUTH")]
        if isinstance(server, SubmissionSMTP) and server.encrypted():
            responses.insert(-1, "250-AUTH " + " ".join(MECHANISMS))
        return responses

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: SmtpEnvelope,
                          address: str, mail_options: list[str]) -> str:
        user = server.user if isinstance(server, SubmissionSMTP) else None
        if user is None:
            return "530 5.7.0 Authentication required"
        why = authorize.check_envelope(self._current(user).allowed_from, address)
        if why is not None:
            log.warning("reject: MAIL from [%s] user %s: %s", _peer(session), user.name, why)
            return authorize.REFUSAL
        return await super().handle_MAIL(server, session, envelope, address, mail_options)

    def refuse_content(self, server: SMTP, content: bytes) -> str | None:
        user = server.user if isinstance(server, SubmissionSMTP) else None
        if user is None:
            return "530 5.7.0 Authentication required"
        why = authorize.check_header(self._current(user).allowed_from, content)
        if why is not None:
            log.warning("reject: DATA from [%s] user %s: %s",
                        _peer(server.session), user.name, why)
            return authorize.REFUSAL
        return None

    def identity(self, server: SMTP) -> tuple[str, str, bool]:
        user = server.user if isinstance(server, SubmissionSMTP) else None
        if user is None:
            return "", "", False
        return user.name, server.mechanism if isinstance(server, SubmissionSMTP) else "", \
            self._current(user).priority

    def _current(self, user: User) -> User:
        """The user as the users file says now (allowed_from may have changed since AUTH)."""
        return self.users.get(user.name) or dataclasses.replace(user, allowed_from=())


def refresh_users(users: UsersFile) -> None:
    """Re-read the users file if it changed; a bad file is logged once and the users read
    before stay in force. Blocking."""
    try:
        if users.refresh():
            log.info("users_file %s re-read: %d user(s)", users.path, len(users.names()))
    except ConfigError as exc:
        log.error("users_file %s not re-read, the users before stay in force: %s", users.path,
                  "; ".join(str(p) for p in exc.problems))


def _peer(session: Session | None) -> str:
    peer = session.peer if session is not None else None
    return str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"


class SubmissionServer(Listener):
    """One ``submission:`` listener: binds its address, with its TLS and its AUTH guard."""

    def __init__(self, settings: ListenerSettings, acceptor: Acceptor, *,
                 listener: SubmissionListener, users: UsersFile, executor: Executor,
                 metrics: Recorder, tls: ServerTls) -> None:
        super().__init__(settings, acceptor)
        self.sub = listener
        self.tls = tls
        self.auth_handler = SubmissionHandler(settings, acceptor, listener=listener, users=users,
                                              verify_executor=executor, metrics=metrics)
        self.handler = self.auth_handler

    def _factory(self) -> RelaySMTP:
        starttls = self.tls.current if self.sub.tls is TlsMode.STARTTLS else None
        return SubmissionSMTP(
            self.auth_handler, hostname=self.settings.hostname, ident="relayd ESMTP",
            data_size_limit=self.settings.max_message_size, enable_SMTPUTF8=True,
            decode_data=False, timeout=self.settings.command_timeout, tls_context=starttls,
            command_call_limit={"NOOP": 50, "RSET": 200, "HELP": 10, "VRFY": 10, "EXPN": 10,
                                "AUTH": 20, "STARTTLS": 2, "*": 100000})

    async def start(self, sockets: list[Any] | None = None) -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        hp = self.sub.listen
        ssl_ctx = self.tls.current if self.sub.tls is TlsMode.IMPLICIT else None
        self._servers.append(await loop.create_server(self._factory, host=hp.host, port=hp.port,
                                                      reuse_address=True, ssl=ssl_ctx))
        return self.addresses


class Submission:
    """Every submission listener of a Config, sharing one users file and the Acceptor."""

    def __init__(self, config: Config, acceptor: Acceptor, *, executor: Executor,
                 metrics: Recorder) -> None:
        assert config.users_file is not None  # the config requires it with submission
        self._executor = executor
        self.users = UsersFile(config.users_file)
        metrics.declare_auth()
        base = ListenerSettings.from_config(config)
        self.listeners = [
            SubmissionServer(_settings(base, sub), acceptor, listener=sub, users=self.users,
                                executor=executor, metrics=metrics,
                                tls=ServerTls(sub.cert_file, sub.key_file))
            for sub in config.submission]

    async def start(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        for lst in self.listeners:
            out += await lst.start()
        return out

    def stop_accepting(self) -> None:
        for lst in self.listeners:
            lst.stop_accepting()

    async def aclose(self, grace: float) -> None:
        await asyncio.gather(*(lst.aclose(grace=grace) for lst in self.listeners))

    def reload(self, new: Config, done: Callable[[], object] | None = None) -> None:
        """SIGHUP: the certificates and the users file are read again, in a worker thread;
        the listeners' limits and allowed_clients apply to new sessions at once."""
        base = ListenerSettings.from_config(new)
        by_listen = {sub.listen: sub for sub in new.submission}
        for lst in self.listeners:
            sub = by_listen.get(lst.sub.listen)
            if sub is None:
                log.warning("submission listener %s removed from the config: a restart "
                            "stops it", lst.sub.listen)
                continue
            lst.sub = lst.auth_handler.settings_sub = sub
            lst.auth_handler.settings = lst.settings = _settings(base, sub)
        if len(by_listen) > len(self.listeners):
            log.warning("new submission listeners need a restart")
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._reload_files)
        if done is not None:
            future.add_done_callback(lambda _f: done())

    def _reload_files(self) -> None:
        refresh_users(self.users)
        for lst in self.listeners:
            try:
                lst.tls.reload(lst.sub.cert_file, lst.sub.key_file)
                log.info("submission %s: TLS certificate re-read from %s", lst.sub.listen,
                         lst.sub.cert_file)
            except (OSError, ValueError) as exc:
                log.error("submission %s: TLS certificate not re-read, keeping the running "
                          "one: %s", lst.sub.listen, exc)


def _settings(base: ListenerSettings, sub: SubmissionListener) -> ListenerSettings:
    return dataclasses.replace(base, listen=(sub.listen,), allowed_clients=sub.allowed_clients)
