"""Delivery to one smarthost through SmarthostPool, against the fake upstream on loopback."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from dataclasses import replace

import pytest

from relayd.config.schema import AuthConfig, AuthMethod, Smarthost, TlsMode
from relayd.delivery.smtp.pool import SmarthostPool
from relayd.errors import OAuthError
from relayd.model import Status
from relayd.secrets import Secret
from tests.support.ports import free_port
from tests.support.upstream import FakeUpstream
from tests.support.waiting import wait_until

MSG = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nHello.\r\n"
PASSWORD = "s3cret-Pa55word"


def pw_auth(method: AuthMethod = AuthMethod.AUTO, user: str = "relay") -> AuthConfig:
    return AuthConfig(method=method, username=user, password=Secret(PASSWORD))


class FakeTokens:
    """A TokenSource handing out tokens in order; records invalidations."""

    def __init__(self, *tokens: str, error: OAuthError | None = None) -> None:
        self.tokens = list(tokens)
        self.invalidated: list[str] = []
        self.error = error
        self.calls = 0

    async def get_token(self) -> str:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.tokens[0]

    def invalidate(self, token: str) -> None:
        self.invalidated.append(token)
        if self.tokens and self.tokens[0] == token and len(self.tokens) > 1:
            self.tokens.pop(0)

    def forget_failure(self) -> None:
        pass


async def deliver(sh: Smarthost, content: bytes = MSG, rcpts: tuple[str, ...] = ("b@example.net",),
                  mail_from: str = "a@example.com", **kw: object) -> object:
    pool = SmarthostPool(sh, hostname="relay.test", **kw)  # type: ignore[arg-type]
    try:
        return await pool.deliver("Q1", content, mail_from, rcpts)
    finally:
        await pool.aclose()


# -- TLS modes --------------------------------------------------------------------------------

@pytest.mark.parametrize("tls", ["none", "starttls", "implicit"])
async def test_each_tls_mode_delivers_and_reports_relay(tls: str) -> None:
    async with FakeUpstream(tls=tls) as up:
        sh = up.smarthost(name="primary")
        result = await deliver(sh)
        assert result.delivered == ("b@example.net",)
        assert result.relay == f"primary[127.0.0.1]:{up.port}"
        assert not result.smarthost_fault
        assert up.messages[0].tls is (tls != "none")
        assert up.messages[0].data == MSG


async def test_starttls_not_offered_defers_and_sends_nothing_in_clear() -> None:
    async with FakeUpstream(tls="none", auth=("PLAIN",), credentials={"relay": PASSWORD}) as up:
        sh = up.smarthost(tls=TlsMode.STARTTLS, auth=pw_auth())
        result = await deliver(sh)
        assert result.deferred == ("b@example.net",)
        assert result.smarthost_fault
        assert "STARTTLS" in result.error
        # Only EHLO went over the wire: no AUTH, no MAIL, no content.
        assert [c for c in up.commands if not c.startswith(("EHLO", "QUIT"))] == []
        assert up.messages == [] and up.auth_attempts == []


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_untrusted_certificate_is_a_smarthost_fault(tls: str) -> None:
    async with FakeUpstream(tls=tls) as up:
        sh = up.smarthost(ca_file=up.other_ca_file)
        result = await deliver(sh)
        assert result.deferred == ("b@example.net",)
        assert result.smarthost_fault
        assert "certificate verify failed" in result.error
        assert up.messages == []


async def test_verify_certificate_false_accepts_an_unknown_ca() -> None:
    async with FakeUpstream(tls="starttls") as up:
        result = await deliver(up.smarthost(ca_file=up.other_ca_file, verify_certificate=False))
        assert result.delivered == ("b@example.net",)


async def test_custom_helo_is_used() -> None:
    async with FakeUpstream() as up:
        await deliver(up.smarthost(helo="mx.custom.example"))
        assert up.commands[0] == "EHLO mx.custom.example"
        await deliver(up.smarthost())
        assert "EHLO relay.test" in up.commands


# -- AUTH -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", [AuthMethod.PLAIN, AuthMethod.LOGIN, AuthMethod.CRAM_MD5])
async def test_each_password_mechanism(method: AuthMethod) -> None:
    async with FakeUpstream(tls="starttls", auth=("PLAIN", "LOGIN", "CRAM-MD5"),
                            credentials={"relay": PASSWORD}, require_auth=True) as up:
        result = await deliver(up.smarthost(auth=pw_auth(method)))
        assert result.delivered == ("b@example.net",)
        assert up.messages[0].auth_mechanism == method.value.upper()
        assert up.messages[0].auth_login == "relay"


async def test_auto_prefers_cram_md5_when_offered() -> None:
    async with FakeUpstream(tls="starttls", auth=("PLAIN", "LOGIN", "CRAM-MD5"),
                            credentials={"relay": PASSWORD}) as up:
        await deliver(up.smarthost(auth=pw_auth()))
        assert up.messages[0].auth_mechanism == "CRAM-MD5"


async def test_auto_falls_through_o365_504_to_login() -> None:
    async with FakeUpstream(tls="starttls", auth=("PLAIN", "LOGIN"), refuse_plain=True,
                            credentials={"relay": PASSWORD}, require_auth=True) as up:
        result = await deliver(up.smarthost(auth=pw_auth()))
        assert result.delivered == ("b@example.net",)
        assert up.messages[0].auth_mechanism == "LOGIN"


async def test_explicit_plain_against_o365_is_an_auth_fault() -> None:
    async with FakeUpstream(tls="starttls", auth=("PLAIN", "LOGIN"), refuse_plain=True,
                            credentials={"relay": PASSWORD}) as up:
        result = await deliver(up.smarthost(auth=pw_auth(AuthMethod.PLAIN)))
        assert result.smarthost_fault and result.deferred == ("b@example.net",)
        assert result.outcomes[0].reply.code == 504


async def test_wrong_password_defers_after_a_single_attempt() -> None:
    async with FakeUpstream(tls="starttls", auth=("PLAIN", "LOGIN"),
                            credentials={"relay": "other"}) as up:
        result = await deliver(up.smarthost(auth=pw_auth()))
        assert result.deferred == ("b@example.net",)
        assert result.smarthost_fault
        assert result.outcomes[0].reply.code == 535
        # auto must not try LOGIN after PLAIN's 535: that doubles lockout counters.
        assert len(up.auth_attempts) == 1
        assert up.messages == []


@pytest.mark.parametrize("style", ["google", "microsoft"])
async def test_xoauth2_refreshes_a_rejected_token_once(style: str) -> None:
    async with FakeUpstream(tls="starttls", auth=("XOAUTH2",), tokens=["fresh-token"],
                            xoauth2_style=style, require_auth=True) as up:
        tokens = FakeTokens("stale-token", "fresh-token")
        sh = up.smarthost(auth=AuthConfig(method=AuthMethod.XOAUTH2, username="relay@example.com"))
        result = await deliver(sh, token_source=tokens)
        assert result.delivered == ("b@example.net",)
        assert tokens.invalidated == ["stale-token"]
        assert [a.secret for a in up.auth_attempts] == ["stale-token", "fresh-token"]
        assert up.messages[0].auth_mechanism == "XOAUTH2"
        assert up.messages[0].auth_login == "relay@example.com"


async def test_xoauth2_rejected_twice_is_an_auth_fault() -> None:
    async with FakeUpstream(tls="starttls", auth=("XOAUTH2",), tokens=["never"]) as up:
        tokens = FakeTokens("bad-1", "bad-2")
        sh = up.smarthost(auth=AuthConfig(method=AuthMethod.XOAUTH2, username="relay@example.com"))
        result = await deliver(sh, token_source=tokens)
        assert result.smarthost_fault and result.deferred == ("b@example.net",)
        assert len(up.auth_attempts) == 2
        assert result.outcomes[0].reply.code == 535


async def test_oauth_error_defers_with_smarthost_fault_and_sends_no_auth() -> None:
    async with FakeUpstream(tls="starttls", auth=("XOAUTH2",)) as up:
        tokens = FakeTokens(error=OAuthError("refresh token revoked", hint="run relayd oauth authorize"))
        sh = up.smarthost(auth=AuthConfig(method=AuthMethod.XOAUTH2, username="relay@example.com"))
        result = await deliver(sh, token_source=tokens)
        assert result.smarthost_fault and result.deferred == ("b@example.net",)
        assert "refresh token revoked" in result.error
        assert up.auth_attempts == [] and up.messages == []


# -- per-recipient outcomes and message-level replies -----------------------------------------

async def test_mixed_recipient_outcomes() -> None:
    replies = {"rcpt": {"later@example.net": "450 4.2.1 mailbox busy",
                        "gone@example.net": "550 5.1.1 user unknown"}}
    async with FakeUpstream(replies=replies) as up:
        rcpts = ("ok@example.net", "later@example.net", "gone@example.net")
        result = await deliver(up.smarthost(), rcpts=rcpts)
        assert [o.status for o in result.outcomes] == [Status.SENT, Status.DEFERRED, Status.FAILED]
        assert [o.dsn for o in result.outcomes] == ["2.0.0", "4.2.1", "5.1.1"]
        assert not result.smarthost_fault
        assert up.messages[0].rcpt_tos == ["ok@example.net"]


@pytest.mark.parametrize(("stage", "reply", "status", "fault"), [
    ("mail", "550 5.7.1 sender rejected", Status.FAILED, False),
    ("mail", "550 5.4.5 Daily user sending quota exceeded.", Status.DEFERRED, True),
    ("mail", "421 4.7.0 Try again later, closing connection.", Status.DEFERRED, True),
    ("data", "554 5.5.1 no valid recipients", Status.FAILED, False),
    ("dot", "554 5.7.1 Message rejected as spam", Status.FAILED, False),
    ("dot", "451 4.3.0 Temporary failure", Status.DEFERRED, False),
    # A 552 after the data is "message too big": permanent (only at RCPT is it read as 452).
    ("dot", "552 5.3.4 Message size exceeds fixed maximum message size", Status.FAILED, False),
    ("dot", "550 5.4.5 Daily SMTP relay limit exceeded for user", Status.DEFERRED, True),
])
async def test_message_level_replies(stage: str, reply: str, status: Status, fault: bool) -> None:
    async with FakeUpstream(replies={stage: reply}) as up:
        result = await deliver(up.smarthost(), rcpts=("a@example.net", "b@example.net"))
        assert [o.status for o in result.outcomes] == [status, status]
        assert result.smarthost_fault is fault
        assert str(result.outcomes[0].reply) == reply


@pytest.mark.parametrize("refusal", ["452 4.5.3 Too many recipients", "552 5.5.3 Too many recipients"])
async def test_too_many_recipients_continue_in_a_new_transaction(refusal: str) -> None:
    # One command at a time: after b@'s refusal, c@ was never offered in the first transaction.
    # (Pipelined, c@ is already sent and accepted there: tests/integration/test_pipelining.py.)
    # A 552 is read as 452: servers have answered "too many recipients" with it (RFC 5321
    # §4.5.3.1.10).
    async with FakeUpstream(replies={"rcpt": {"b@example.net": [refusal]}}, pipelining=False) as up:
        result = await deliver(up.smarthost(), rcpts=("a@example.net", "b@example.net", "c@example.net"))
        assert result.delivered == ("a@example.net", "b@example.net", "c@example.net")
        assert [m.rcpt_tos for m in up.messages] == [["a@example.net"], ["b@example.net", "c@example.net"]]


@pytest.mark.parametrize(("reply", "status", "dsn"), [
    ("552 5.5.3 Too many recipients", Status.DEFERRED, "4.5.3"),
    ("552 Too many recipients", Status.DEFERRED, "4.0.0"),
    ("552 5.3.4 Message too big for this recipient", Status.FAILED, "5.3.4"),
])
async def test_a_552_to_the_first_rcpt_defers_it_unless_the_message_is_too_big(
        reply: str, status: Status, dsn: str) -> None:
    async with FakeUpstream(replies={"rcpt": {"a@example.net": [reply]}}) as up:
        result = await deliver(up.smarthost(), rcpts=("a@example.net",))
        assert [(o.status, o.dsn) for o in result.outcomes] == [(status, dsn)]
        assert not result.smarthost_fault and up.messages == []
        if status is Status.DEFERRED:  # the server's words stay, under the code relayd read
            text = reply[4:].replace("5.5.3", "4.5.3")
            assert str(result.outcomes[0].reply) == (
                f"452 {text} (552 treated as 452, RFC 5321 section 4.5.3.1.10)")

# -- content ----------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [
    b".leading dot\r\n..two dots\r\n.\r\nmiddle\r\n.\r\n",
    b"Subject: caf\xc3\xa9\r\n\r\n8-bit \xe2\x82\xac body\r\n",
    b"no final newline",
    b"",
])
async def test_content_arrives_byte_exact(content: bytes) -> None:
    async with FakeUpstream() as up:
        result = await deliver(up.smarthost(), content=content)
        assert result.delivered == ("b@example.net",)
        expected = content if content.endswith(b"\r\n") or not content else content + b"\r\n"
        assert up.messages[0].data == expected
        assert ("BODY=8BITMIME" in up.messages[0].mail_options) is (not content.isascii())



# -- a smarthost without 8BITMIME (RFC 6152 §3: convert to 7 bit, or do not deliver) ---------------

EIGHT_BIT = (b"From: a@example.com\r\nTo: b@example.net\r\nSubject: hi\r\nMIME-Version: 1.0\r\n"
             b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
             b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n.dot line\r\n")


async def test_an_8bit_body_is_converted_for_a_server_without_8bitmime(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relayd.forwarder")
    async with FakeUpstream(eightbitmime=False, size_limit=10_000, pipelining=False) as up:
        result = await deliver(up.smarthost(), content=EIGHT_BIT, transcripts=True)
        assert result.delivered == ("b@example.net",)
        got = up.messages[0]
        assert got.data.isascii() and "BODY=8BITMIME" not in got.mail_options
        assert got.data.endswith(b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                                 b"Gr=C3=BC=C3=9Fe aus K=C3=B6ln\r\n.dot line\r\n")
        # SIZE announces what is sent: the converted message (RFC 1870).
        assert f"SIZE={len(got.data)}" in got.mail_options
        note = ("smarthost fake does not offer 8BITMIME: the 8-bit body was converted to "
                "quoted-printable (1 MIME part; RFC 6152)")
        assert f"relayd: {note}" in result.transcript
        assert f"Q1: {note}" in caplog.messages


async def test_a_7bit_body_is_sent_as_it_is_to_a_server_without_8bitmime() -> None:
    async with FakeUpstream(eightbitmime=False) as up:
        result = await deliver(up.smarthost(), transcripts=True)
        assert result.delivered == ("b@example.net",)
        assert up.messages[0].data == MSG
        assert not any(line.startswith("relayd:") for line in result.transcript)


async def test_8bit_headers_to_a_server_without_8bitmime_fail_5_6_3_and_nothing_is_sent() -> None:
    content = EIGHT_BIT.replace(b"Subject: hi", b"Subject: K\xc3\xb6ln")
    async with FakeUpstream(eightbitmime=False) as up:
        pool = SmarthostPool(up.smarthost(), hostname="relay.test")
        result = await pool.deliver("Q1", content, "a@example.com", ["b@example.net", "c@example.net"])
        assert result.failed == ("b@example.net", "c@example.net")
        assert {o.dsn for o in result.outcomes} == {"5.6.3"}
        assert str(result.outcomes[0].reply) == (
            "554 5.6.3 smarthost fake does not offer 8BITMIME and the message has 8-bit headers (RFC 6152)")
        assert not result.smarthost_fault
        assert not any(c.startswith(("MAIL", "DATA")) for c in up.commands)
        # Nothing was started on the session: the next message uses the same connection.
        assert (await pool.deliver("Q2", MSG, "a@example.com", ["b@example.net"])).delivered
        assert up.connections == 1
        await pool.aclose()


async def test_the_size_limit_is_checked_on_the_converted_message() -> None:
    # Quoted-printable makes 8-bit text longer: the server's SIZE decides on what would be sent.
    async with FakeUpstream(eightbitmime=False, size_limit=len(EIGHT_BIT) + 10) as up:
        result = await deliver(up.smarthost(), content=EIGHT_BIT)
        assert result.failed == ("b@example.net",) and result.outcomes[0].dsn == "5.3.4"
        assert up.messages == []

async def test_null_sender_and_size_parameter() -> None:
    async with FakeUpstream(size_limit=10_000) as up:
        await deliver(up.smarthost(), mail_from="")
        assert up.commands[1] == f"MAIL FROM:<> SIZE={len(MSG)}"
        assert up.messages[0].mail_from == ""


async def test_message_over_the_servers_size_limit_fails_without_sending() -> None:
    async with FakeUpstream(size_limit=20) as up:
        result = await deliver(up.smarthost())
        assert result.failed == ("b@example.net",)
        assert result.outcomes[0].dsn == "5.3.4"
        assert not any(c.startswith("MAIL") for c in up.commands)


async def test_non_ascii_address_uses_smtputf8_or_fails_cleanly() -> None:
    async with FakeUpstream(smtputf8=True) as up:
        result = await deliver(up.smarthost(), rcpts=("pelé@example.net",))
        assert result.delivered == ("pelé@example.net",)
        assert "SMTPUTF8" in up.messages[0].mail_options
    async with FakeUpstream(smtputf8=False) as up:
        result = await deliver(up.smarthost(), rcpts=("pelé@example.net",))
        assert result.failed == ("pelé@example.net",)
        assert result.outcomes[0].dsn == "5.6.7"
        assert up.messages == []


# -- connections ------------------------------------------------------------------------------

async def test_connection_is_reused_across_messages_and_after_a_failed_transaction() -> None:
    async with FakeUpstream(replies={"rcpt": {"gone@example.net": "550 5.1.1 user unknown"}}) as up:
        pool = SmarthostPool(up.smarthost(), hostname="relay.test")
        for i in range(3):
            result = await pool.deliver(f"Q{i}", MSG, "a@example.com", ["b@example.net"])
            assert result.delivered == ("b@example.net",)
        failed = await pool.deliver("Q9", MSG, "a@example.com", ["gone@example.net"])
        assert failed.failed == ("gone@example.net",)
        again = await pool.deliver("Q10", MSG, "a@example.com", ["b@example.net"])
        assert again.delivered == ("b@example.net",)
        assert up.connections == 1
        assert "RSET" in up.commands
        stats = pool.statistics()
        assert stats.connections_opened == 1 and stats.idle == 1 and stats.busy == 0
        await pool.aclose()
        assert up.commands[-1] == "QUIT"


async def test_max_connections_is_respected() -> None:
    async with FakeUpstream() as up:
        pool = SmarthostPool(up.smarthost(max_connections=2), hostname="relay.test")
        results = await asyncio.gather(*(pool.deliver(f"Q{i}", MSG, "a@example.com", ["b@example.net"])
                                         for i in range(8)))
        assert all(r.delivered == ("b@example.net",) for r in results)
        assert up.max_concurrent <= 2 and up.connections <= 2
        assert len(up.messages) == 8
        await pool.aclose()


async def test_idle_connection_closed_by_server_is_replaced() -> None:
    async with FakeUpstream() as up:
        pool = SmarthostPool(up.smarthost(), hostname="relay.test")
        await pool.deliver("Q1", MSG, "a@example.com", ["b@example.net"])
        for proto in list(up._protocols):
            proto.transport.close()
        await wait_until(lambda: not pool.statistics().idle, 5, "the closed idle connection noticed",
                         interval=0.01)
        result = await pool.deliver("Q2", MSG, "a@example.com", ["b@example.net"])
        assert result.delivered == ("b@example.net",)
        assert up.connections == 2
        await pool.aclose()


@pytest.mark.parametrize("stage", ["greeting", "ehlo", "mail", "rcpt", "body"])
async def test_disconnect_defers_and_the_next_attempt_reconnects(stage: str) -> None:
    async with FakeUpstream(drop_at=stage, drop_once=True) as up:
        pool = SmarthostPool(up.smarthost(), hostname="relay.test")
        first = await pool.deliver("Q1", MSG, "a@example.com", ["b@example.net"])
        assert first.deferred == ("b@example.net",)
        assert first.smarthost_fault
        assert up.messages == []
        second = await pool.deliver("Q2", MSG, "a@example.com", ["b@example.net"])
        assert second.delivered == ("b@example.net",)
        await pool.aclose()


async def test_disconnect_after_the_final_dot_defers() -> None:
    async with FakeUpstream(drop_at="dot") as up:
        result = await deliver(up.smarthost())
        assert result.deferred == ("b@example.net",)
        assert result.outcomes[0].dsn.startswith("4.")


@pytest.mark.parametrize("stage", ["greeting", "ehlo", "mail", "rcpt", "data"])
async def test_stalled_server_times_out_per_command(stage: str) -> None:
    async with FakeUpstream(hang_at=stage) as up:
        started = time.monotonic()
        result = await deliver(up.smarthost(timeout=0.3))
        assert time.monotonic() - started < 3
        assert result.deferred == ("b@example.net",)
        assert result.smarthost_fault
        assert "timed out" in result.error


async def test_final_dot_waits_for_the_data_timeout_not_the_command_timeout() -> None:
    async with FakeUpstream(hang_at="dot") as up:
        started = time.monotonic()
        result = await deliver(up.smarthost(timeout=0.1), data_timeout=0.6)
        elapsed = time.monotonic() - started
        assert 0.5 < elapsed < 3
        assert result.deferred == ("b@example.net",)


def test_final_dot_timeout_is_at_least_ten_minutes() -> None:
    pool = SmarthostPool(Smarthost(name="x", host="127.0.0.1", timeout=5), hostname="relay.test")
    assert pool._data_timeout >= 600


async def test_refused_connection_is_a_smarthost_fault() -> None:
    port = free_port()
    sh = Smarthost(name="dead", host="127.0.0.1", port=port, tls=TlsMode.NONE, timeout=1)
    result = await deliver(sh)
    assert result.smarthost_fault and result.deferred == ("b@example.net",)
    assert "refused" in result.error.lower()
    assert result.outcomes[0].dsn == "4.4.1"


async def test_greeting_421_is_a_smarthost_fault() -> None:
    async with FakeUpstream(replies={"greeting": "421 4.3.2 Service not available"}) as up:
        result = await deliver(up.smarthost())
        assert result.smarthost_fault and result.deferred == ("b@example.net",)
        assert result.outcomes[0].reply.code == 421


# -- outbox -----------------------------------------------------------------------------------

async def test_outbox_writes_one_eml_per_message(tmp_path) -> None:  # type: ignore[no-untyped-def]
    sh = Smarthost(name="preview", outbox=tmp_path / "outbox")
    pool = SmarthostPool(sh, hostname="relay.test")
    r1 = await pool.deliver("ABC", MSG, "a@example.com", ["b@example.net", "c@example.net"])
    r2 = await pool.deliver("ABC", MSG, "a@example.com", ["d@example.net"])
    assert r1.delivered == ("b@example.net", "c@example.net") and r2.delivered == ("d@example.net",)
    assert r1.relay == "preview[outbox]"
    files = sorted(p.name for p in (tmp_path / "outbox").iterdir())
    assert files == ["ABC.1.eml", "ABC.eml"]
    data = (tmp_path / "outbox" / "ABC.eml").read_bytes()
    assert data.startswith(b"Return-Path: <a@example.com>\r\nEnvelope-To: b@example.net, c@example.net\r\n")
    assert data.endswith(MSG)


# -- transcripts ------------------------------------------------------------------------------

def _secret_forms(user: str, password: str) -> list[str]:
    b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    return [password, b64(password), b64(f"\0{user}\0{password}")]


async def test_transcripts_log_the_conversation_with_auth_redacted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with FakeUpstream(tls="starttls", auth=("PLAIN", "LOGIN"), refuse_plain=True,
                            credentials={"relay": PASSWORD}) as up:
        result = await deliver(up.smarthost(auth=pw_auth()), transcripts=True)
    assert result.delivered == ("b@example.net",)
    text = "\n".join(r.getMessage() for r in caplog.records) + "\n".join(result.transcript)
    assert "C: MAIL FROM:<a@example.com>" in text
    assert "C: AUTH PLAIN <redacted>" in text
    assert "S: 235" in text
    for secret in [*_secret_forms("relay", PASSWORD), base64.b64encode(b"relay").decode()]:
        assert secret not in text


async def test_transcripts_never_show_oauth_tokens(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with FakeUpstream(tls="starttls", auth=("XOAUTH2",), tokens=["tok-2"]) as up:
        sh = up.smarthost(auth=AuthConfig(method=AuthMethod.XOAUTH2, username="r@example.com"))
        result = await deliver(sh, token_source=FakeTokens("tok-1", "tok-2"), transcripts=True)
    assert result.delivered == ("b@example.net",)
    text = "\n".join(r.getMessage() for r in caplog.records) + "\n".join(result.transcript)
    assert "tok-1" not in text and "tok-2" not in text
    assert "eyJzdGF0dXMi" not in text  # Google's base64 JSON error challenge
    assert "C: AUTH XOAUTH2 <redacted>" in text


async def test_no_transcript_unless_enabled(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with FakeUpstream() as up:
        result = await deliver(up.smarthost())
    assert result.transcript == ()
    assert not any("MAIL FROM" in r.getMessage() for r in caplog.records if r.name.startswith("relayd"))


def test_smarthost_relay_name() -> None:
    sh = replace(Smarthost(name="primary", host="smtp.example.com"), port=587)
    assert SmarthostPool(sh, hostname="h").smarthost.relay == "primary[smtp.example.com]:587"


async def test_server_without_esmtp_gets_helo_on_plain_connections() -> None:
    async with FakeUpstream(replies={"ehlo": "500 5.5.1 command not recognized"}) as up:
        result = await deliver(up.smarthost())
        assert result.delivered == ("b@example.net",)
        assert up.commands[:2] == ["EHLO relay.test", "HELO relay.test"]
        assert up.messages[0].mail_options == []


async def test_cancelled_delivery_does_not_leave_a_reusable_connection() -> None:
    async with FakeUpstream(hang_at="dot") as up:
        pool = SmarthostPool(up.smarthost(), hostname="relay.test", data_timeout=30)
        task = asyncio.create_task(pool.deliver("Q1", MSG, "a@example.com", ["b@example.net"]))
        await up.wait_connections(1)
        await wait_until(lambda: "DATA" in up.commands, 5, "DATA at the upstream", interval=0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stats = pool.statistics()
        assert stats.busy == 0 and stats.idle == 0
        up.hang_at = None
        result = await pool.deliver("Q2", MSG, "a@example.com", ["b@example.net"])
        assert result.delivered == ("b@example.net",)
        assert up.connections == 2
        await pool.aclose()


async def test_auth_configured_but_not_offered_is_a_fault_and_sends_nothing() -> None:
    async with FakeUpstream(tls="none") as up:
        result = await deliver(up.smarthost(tls=TlsMode.NONE, auth=pw_auth(AuthMethod.PLAIN)))
        assert result.smarthost_fault and result.deferred == ("b@example.net",)
        assert "does not offer AUTH" in result.error
        assert not any(c.startswith("MAIL") for c in up.commands)


async def test_old_connections_are_retired_and_idle_ones_reaped(monkeypatch: pytest.MonkeyPatch) -> None:
    import relayd.delivery.smtp.pool as fw
    async with FakeUpstream() as up:
        monkeypatch.setattr(fw, "MAX_CONNECTION_AGE", 0.0)
        pool = SmarthostPool(up.smarthost(), hostname="relay.test")
        for i in range(2):
            assert (await pool.deliver(f"Q{i}", MSG, "a@example.com", ["b@example.net"])).delivered
        assert up.connections == 2  # each connection retired (QUIT) after its message
        monkeypatch.setattr(fw, "MAX_CONNECTION_AGE", 300.0)
        monkeypatch.setattr(fw, "IDLE_CLOSE_AFTER", 0.05)
        assert (await pool.deliver("Q3", MSG, "a@example.com", ["b@example.net"])).delivered
        await wait_until(lambda: not up.open_sessions, 5, "the idle connection reaped")
        assert up.open_sessions == 0 and pool.statistics().open_connections == 0
        await pool.aclose()
        assert up.commands.count("QUIT") == 2


async def test_partial_delivery_is_never_reported_as_a_smarthost_fault() -> None:
    replies = {"rcpt": {"b@example.net": "550 5.4.5 Daily user sending quota exceeded."}}
    async with FakeUpstream(replies=replies) as up:
        result = await deliver(up.smarthost(), rcpts=("a@example.net", "b@example.net"))
        assert [o.status for o in result.outcomes] == [Status.SENT, Status.DEFERRED]
        assert not result.smarthost_fault  # else a caller could re-send a@ as "deferred"
        assert up.messages[0].rcpt_tos == ["a@example.net"]
