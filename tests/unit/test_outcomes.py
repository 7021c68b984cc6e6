"""Reply classification tables (SPEC "Delivery outcome rules") and the diagnosis table."""

from __future__ import annotations

import ssl

import pytest
from aiosmtplib.errors import SMTPConnectError, SMTPServerDisconnected

from relayd.delivery.diagnose import diagnose
from relayd.delivery.outcomes import (
    classify_reply,
    is_hard_bounce,
    is_quota,
    is_smarthost_fault,
    local_reply,
    rcpt_reply,
)
from relayd.errors import OAuthError
from relayd.model import Reply, Status


@pytest.mark.parametrize(("code", "text", "status"), [
    (250, "2.0.0 Ok: queued as 123", Status.SENT),
    (251, "2.1.5 User not local; will forward", Status.SENT),
    (450, "4.2.1 The user you are trying to contact is receiving mail too quickly", Status.DEFERRED),
    (451, "4.7.1 Greylisted, try again later", Status.DEFERRED),
    (421, "4.7.0 Try again later, closing connection", Status.DEFERRED),
    (550, "5.1.1 The email account that you tried to reach does not exist", Status.FAILED),
    (554, "5.7.1 Message rejected: spam", Status.FAILED),
    (552, "5.3.4 Message size exceeds fixed limit", Status.FAILED),
    # provider quota replies are temporary whatever their code
    (550, "5.4.5 Daily user sending quota exceeded.", Status.DEFERRED),
    (550, "5.4.5 Daily SMTP relay limit exceeded for user", Status.DEFERRED),
    (554, "Throttling failure: Daily message quota exceeded.", Status.DEFERRED),
    (454, "Throttling failure: Maximum sending rate exceeded.", Status.DEFERRED),
    (554, "5.2.252 SendAsDenied; relay@example.com not allowed to send as boss@example.com",
     Status.FAILED),
    (550, "5.2.254 Sender is throttled due to continuous errors", Status.DEFERRED),
    # garbled or missing replies are never permanent
    (-1, "Malformed SMTP response line", Status.DEFERRED),
    (0, "", Status.DEFERRED),
])
def test_classify_reply(code: int, text: str, status: Status) -> None:
    assert classify_reply(Reply(code, text)) is status


@pytest.mark.parametrize(("code", "text", "bounce"), [
    (550, "5.1.1 <bob@example.com>: Recipient address rejected: User unknown", True),
    (550, "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup", True),
    (553, "5.1.3 Bad recipient address syntax", True),
    (550, "5.1.2 Host unknown", True),
    (550, "5.1.6 Mailbox has moved", True),
    (550, "User unknown", True),
    (550, "No such user here", True),
    (550, "5.7.1 Relaying denied", False),
    (450, "4.1.1 Recipient temporarily unavailable", False),
    (550, "5.4.5 Daily sending quota exceeded", False),
    (552, "5.2.2 Mailbox full", False),
    (250, "2.1.5 Ok", False),
])
def test_is_hard_bounce(code: int, text: str, bounce: bool) -> None:
    assert is_hard_bounce(Reply(code, text)) is bounce


def _wrapped(cause: BaseException) -> SMTPConnectError:
    exc = SMTPConnectError("Error connecting")
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(("reply", "exc", "fault"), [
    (Reply(421, "4.3.2 Service shutting down"), None, True),
    (Reply(535, "5.7.8 Authentication credentials invalid"), None, True),
    (Reply(530, "5.7.0 Must issue a STARTTLS command first"), None, True),
    (Reply(550, "5.4.5 Daily user sending quota exceeded"), None, True),
    (Reply(550, "5.1.1 User unknown"), None, False),
    (Reply(451, "4.7.1 Greylisted"), None, False),
    # a 4xx about one message (after the final dot, greylisting) never pauses the smarthost
    (Reply(451, "4.3.0 Try again later"), None, False),
    (Reply(451, "4.7.0 Temporary server error. Please try again later."), None, False),
    (Reply(450, "4.7.0 Greylisted, see https://example.org/greylisting"), None, False),
    (Reply(454, "Throttling failure: Maximum sending rate exceeded."), None, True),
    (Reply(550, "5.7.57 Client not authenticated to send mail"), None, True),
    (Reply(554, "5.7.1 Message rejected"), None, False),
    (None, ConnectionRefusedError(111, "Connection refused"), True),
    (None, _wrapped(ssl.SSLCertVerificationError("certificate verify failed")), True),
    (None, SMTPServerDisconnected("Connection lost"), True),
    (None, TimeoutError(), True),
    (None, OAuthError("refresh token revoked"), True),
    (None, ValueError("bad address"), False),
    (None, None, False),
])
def test_is_smarthost_fault(reply: Reply | None, exc: BaseException | None, fault: bool) -> None:
    assert is_smarthost_fault(reply, exc) is fault


def test_quota_needs_an_error_code() -> None:
    assert not is_quota(Reply(250, "2.0.0 ok, your quota exceeded nothing"))


def test_local_reply_carries_the_dsn() -> None:
    r = local_reply("4.4.1", "connect failed: Connection refused")
    assert r.dsn == "4.4.1"
    assert classify_reply(r) is Status.DEFERRED


@pytest.mark.parametrize(("reply", "read"), [
    # RFC 5321 §4.5.3.1.10: 552 for "too many recipients" is temporary, like 452.
    (Reply(552, "5.5.3 Too many recipients"),
     Reply(452, "4.5.3 Too many recipients (552 treated as 452, RFC 5321 section 4.5.3.1.10)")),
    (Reply(552, "Too many recipients"),
     Reply(452, "Too many recipients (552 treated as 452, RFC 5321 section 4.5.3.1.10)")),
    (Reply(552, "5.2.2 Mailbox full"),
     Reply(452, "4.2.2 Mailbox full (552 treated as 452, RFC 5321 section 4.5.3.1.10)")),
    (Reply(552, ""), Reply(452, "(552 treated as 452, RFC 5321 section 4.5.3.1.10)")),
    # A 552 that says the message is too big stays permanent (retrying meets the same limit).
    (Reply(552, "5.3.4 Message size exceeds fixed maximum message size"),
     Reply(552, "5.3.4 Message size exceeds fixed maximum message size")),
    (Reply(552, "5.2.3 Message length exceeds administrative limit"),
     Reply(552, "5.2.3 Message length exceeds administrative limit")),
    (Reply(550, "5.1.1 No such user"), Reply(550, "5.1.1 No such user")),
    (Reply(452, "4.5.3 Too many recipients"), Reply(452, "4.5.3 Too many recipients")),
])
def test_a_552_to_rcpt_reads_as_452_unless_the_message_is_too_big(reply: Reply, read: Reply) -> None:
    got = rcpt_reply(reply)
    assert got == read
    assert classify_reply(got) is (Status.FAILED if got.code >= 500 else Status.DEFERRED)
    assert got.dsn[0] == str(got.code)[0]
    assert not is_smarthost_fault(got, None)


@pytest.mark.parametrize(("reply", "error", "key"), [
    (Reply(535, "5.7.8 Username and Password not accepted"), "", "bad-credentials"),
    (Reply(535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant"),
     "", "o365-smtp-auth-disabled"),
    (Reply(504, "5.7.4 Unrecognized authentication type"), "", "mechanism-refused"),
    (Reply(554, "5.2.252 SendAsDenied; relay@x.com not allowed to send as a@x.com"), "", "send-as-denied"),
    (Reply(530, "5.7.0 Must issue a STARTTLS command first"), "", "starttls-required"),
    (Reply(554, "Message rejected: Email address is not verified. The following identities failed"),
     "", "domain-not-verified"),
    (Reply(450, "4.7.1 Domain not verified"), "", "domain-not-verified"),
    (Reply(421, "4.7.0 Temporary System Problem"), "", "service-unavailable"),
    (Reply(451, "4.7.5 TLS certificate verification failed"),
     "TLS certificate verify failed for smtp.x: unable to get local issuer certificate", "certificate"),
    (Reply(451, "4.4.1 connect failed: Connection refused"),
     "cannot connect to smtp.x:25: Connection refused", "connection-refused"),
    (Reply(451, "4.4.1 connection timed out"), "timed out connecting to smtp.x:25 after 30s", "timeout"),
    (Reply(451, "4.4.3 cannot resolve the host name (Temporary failure in name resolution)"),
     "cannot connect to smtp.x:587: cannot resolve the host name (Temporary failure in name resolution)",
     "unreachable"),
    (Reply(451, "4.7.4 STARTTLS not offered"), "smtp.x:587: the server does not offer STARTTLS; refusing",
     "starttls-not-offered"),
    (Reply(550, "5.4.5 Daily user sending quota exceeded"), "", "quota"),
    (Reply(554, "5.6.3 smarthost primary does not offer 8BITMIME and the message has 8-bit headers "
                "(RFC 6152)"), "MAIL: 554 5.6.3 smarthost primary does not offer 8BITMIME", "no-8bitmime"),
    (Reply(451, "4.7.0 server does not offer AUTH"),
     "authentication failed at x:25: the server does not offer AUTH (after TLS, if any)", "auth-not-offered"),
])
def test_diagnosis_table(reply: Reply, error: str, key: str) -> None:
    found = diagnose(reply, error)
    assert found is not None
    assert found.key == key
    assert found.fix


def test_gmail_bad_credentials_mentions_app_password() -> None:
    found = diagnose(Reply(535, "5.7.8 Username and Password not accepted"))
    assert found is not None and "App Password" in found.fix


def test_unknown_failure_has_no_diagnosis() -> None:
    assert diagnose(Reply(554, "5.6.0 something odd"), "") is None


def test_diagnosis_table_renders_for_the_docs() -> None:
    from relayd.delivery.diagnose import RULES, as_markdown
    text = as_markdown()
    assert text.count("\n") == len(RULES) + 2
    assert "App Password" in text
