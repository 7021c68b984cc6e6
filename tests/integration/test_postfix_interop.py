"""Interop with a real MTA: relayd hands mail to Debian's Postfix as the smarthost, and Postfix
stores exactly what relayd sent: the queue ID in relayd's ``status=sent`` line is a message
on Postfix's queue with the right envelope and content, in clear text, over verified STARTTLS,
and after SMTP AUTH (PLAIN and LOGIN through Postfix's SASL).

Postfix runs in its own instances (tests/support/postfix_smarthost.py), one per set-up and
module, and keeps every accepted message on its hold queue, where ``postqueue -j`` and
``postcat`` read it back. The test fails, never skips, when Postfix is not installed or not
run as root.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from relayd.model import State
from relayd.spool.records import Entry
from tests.support.postfix_smarthost import Held, PostfixSmarthost
from tests.support.relay import RunningRelay, running_relay, wait_until, write_config

pytestmark = pytest.mark.postfix

MSG = (b"From: App <app@example.com>\r\nTo: user@example.net, other@example.org\r\n"
       b"Subject: interop\r\nMessage-ID: <interop-1@example.com>\r\n\r\n"
       b"first line\r\n.a line that starts with a dot\r\n..two dots\r\nlast line\r\n")
RCPTS = ("user@example.net", "other@example.org")
CREDENTIALS = ("relay", "s3cret pass")


@pytest.fixture(scope="module")
def postfix_clear() -> Iterator[PostfixSmarthost]:
    with PostfixSmarthost() as pf:
        yield pf


@pytest.fixture(scope="module")
def postfix_tls() -> Iterator[PostfixSmarthost]:
    with PostfixSmarthost(tls=True) as pf:
        yield pf


@pytest.fixture(scope="module")
def postfix_auth() -> Iterator[PostfixSmarthost]:
    """STARTTLS required, and relaying only for clients that authenticated as CREDENTIALS."""
    with PostfixSmarthost(tls=True, credentials=CREDENTIALS) as pf:
        yield pf


def _smarthost(pf: PostfixSmarthost, **kw: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": "postfix", "host": pf.host, "port": pf.port,
                             "tls": "starttls" if pf.tls else "none", "timeout": "5s"}
    if pf.ca_file is not None:
        entry["ca_file"] = str(pf.ca_file)
    entry.update(kw)
    return entry


async def _relay_one(relay: RunningRelay, caplog: pytest.LogCaptureFixture) -> tuple[str, str]:
    """Send MSG through relayd; return relayd's queue ID and Postfix's (from the sent line)."""
    qid = await relay.send(MSG, rcpts=RCPTS)
    await wait_until(lambda: not relay.daemon.spool.list(), timeout=15, what="relayd to hand over")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{qid}: to=")]
    assert len(lines) == 2 and all("status=sent" in line for line in lines), lines
    postfix_ids = {m.group(1) for line in lines
                   if (m := re.search(r"250 2\.0\.0 Ok: queued as (\w+)\)$", line))}
    assert len(postfix_ids) == 1, lines  # one transaction, both recipients
    return qid, postfix_ids.pop()


async def _held(pf: PostfixSmarthost) -> list[Held]:
    return await asyncio.to_thread(pf.held)


def _assert_stored_as_sent(held: list[Held], postfix_id: str, qid: str) -> bytes:
    """Postfix holds the message relayd reported, byte for byte; returns its header block."""
    mine = [h for h in held if h.queue_id == postfix_id]
    assert len(mine) == 1, [h.queue_id for h in held]
    msg = mine[0]
    assert msg.sender == "app@example.com"
    assert sorted(msg.recipients) == sorted(RCPTS)
    content = msg.content
    # Postfix's own Received line comes first, then relayd's, then the application's message
    # unchanged (postcat prints LF line ends and the un-dot-stuffed text).
    assert content.startswith(b"Received: from "), content[:200]
    assert b" (Postfix) with ESMTP" in content.split(b"\n\n", 1)[0]
    relayd_received = content.index(b"Received: from ", 10)
    assert b"by relay.test.example" in content[relayd_received:relayd_received + 300]
    assert f"id {qid}".encode() in content[relayd_received:relayd_received + 300]
    assert content.endswith(MSG.replace(b"\r\n", b"\n")), content
    return content.split(b"\n\n", 1)[0]  # the stored header block


async def _logged(pf: PostfixSmarthost, pattern: str, count: int = 1) -> str:
    """Postfix's log once ``pattern`` (a regex) is in it ``count`` times or more. Its daemons
    log through postlogd, one datagram a line, and postlogd writes the file when it gets to
    it: a line can land after the reply it precedes, so wait for it with a deadline."""
    def found() -> str:
        text = pf.log()
        return text if len(re.findall(pattern, text)) >= count else ""
    return await wait_until(found, 15, lambda: f"{pattern!r} x{count} in Postfix's log:\n{pf.log()[-2000:]}")


def _settled(relay: RunningRelay, qid: str) -> Entry | None:
    """relayd's entry once an attempt's error is recorded and the file has left active/ (the
    metadata is written before the move), else None."""
    entry = relay.daemon.spool.get(qid)
    return entry if entry.last_error and entry.state is not State.ACTIVE else None


def _not_handed_over(held: list[Held], qid: str) -> bool:
    """No message on Postfix's queue carries relayd's queue ID (in relayd's Received line)."""
    return not any(f"id {qid}".encode() in h.content for h in held)


async def test_relays_through_postfix_in_clear_text(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, postfix_clear: PostfixSmarthost) -> None:
    caplog.set_level(logging.INFO)
    pf = postfix_clear
    cfg = write_config(tmp_path, [_smarthost(pf)])
    async with running_relay(cfg) as relay:
        qid, postfix_id = await _relay_one(relay, caplog)
    header = _assert_stored_as_sent(await _held(pf), postfix_id, qid)
    assert re.search(rb"by smarthost\.test\.example \(Postfix\) with ESMTP id " + postfix_id.encode(), header)
    await _logged(pf, re.escape(f"{postfix_id}: client=localhost[127.0.0.1]"))
    log = await _logged(pf, re.escape("helo=<relay.test.example>"))
    assert f"{postfix_id}: client=localhost[127.0.0.1]" in log
    assert "helo=<relay.test.example>" in log  # relayd's hostname as the EHLO name


async def test_relays_through_postfix_over_verified_starttls(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, postfix_tls: PostfixSmarthost) -> None:
    caplog.set_level(logging.INFO)
    pf = postfix_tls
    cfg = write_config(tmp_path, [_smarthost(pf, verify_certificate=True)])
    async with running_relay(cfg) as relay:
        qid, postfix_id = await _relay_one(relay, caplog)
    header = _assert_stored_as_sent(await _held(pf), postfix_id, qid)
    # ESMTPS: Postfix received the message over TLS (RFC 3848); it refuses MAIL without it.
    assert re.search(rb"with ESMTPS id " + postfix_id.encode(), header)
    assert re.search(r"TLS connection established from localhost\[127\.0\.0\.1\]: TLSv1\.[23]",
                     await _logged(pf, r"TLS connection established from localhost\[127\.0\.0\.1\]"))


async def test_certificate_from_an_unknown_ca_is_refused_and_mail_waits(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, postfix_tls: PostfixSmarthost) -> None:
    caplog.set_level(logging.INFO)
    pf = postfix_tls
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    cfg = write_config(tmp_path, [_smarthost(pf, ca_file=str(other_ca))])
    async with running_relay(cfg) as relay:
        qid = await relay.send(MSG, rcpts=RCPTS)
        entry = await wait_until(lambda: _settled(relay, qid), timeout=15, what="a failed attempt")
        assert entry is not None
    assert _not_handed_over(await _held(pf), qid)  # nothing sent to an unverified server
    assert entry.state.value == "queued"  # and nothing bounced: it waits for a fix
    assert "certificate" in (entry.last_error or "").lower()


@pytest.mark.parametrize("method", ["auto", "login"])
async def test_relays_through_postfix_with_smtp_auth(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, postfix_auth: PostfixSmarthost,
        method: str) -> None:
    caplog.set_level(logging.INFO)
    pf = postfix_auth
    assert pf.auth is not None
    before = len(pf.auth.attempts)
    password_file = tmp_path / "password"
    password_file.write_text(CREDENTIALS[1] + "\n")
    cfg = write_config(tmp_path, [_smarthost(pf, auth={
        "method": method, "username": CREDENTIALS[0], "password_file": str(password_file)})])
    async with running_relay(cfg) as relay:
        qid, postfix_id = await _relay_one(relay, caplog)
    header = _assert_stored_as_sent(await _held(pf), postfix_id, qid)
    mechanism = "PLAIN" if method == "auto" else "LOGIN"  # auto: the strongest Postfix offers
    assert pf.auth.attempts[before:] == [(mechanism, "relay", True)]
    # ESMTPSA: over TLS and authenticated (RFC 3848); Postfix relays only for SASL clients here.
    assert re.search(rb"with ESMTPSA id " + postfix_id.encode(), header)
    assert re.search(rf"{postfix_id}: client=localhost\[127\.0\.0\.1\], "
                     rf"sasl_method={mechanism}, sasl_username=relay",
                     await _logged(pf, re.escape(f"{postfix_id}: client=localhost[127.0.0.1], ")))
    assert "s3cret" not in caplog.text


async def test_wrong_password_is_refused_by_postfix_and_mail_waits(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, postfix_auth: PostfixSmarthost,
        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO)
    pf = postfix_auth
    assert pf.auth is not None
    before = len(pf.auth.attempts)
    monkeypatch.setenv("RELAYD_TEST_PW", "wrong horse")
    cfg = write_config(tmp_path, [_smarthost(pf, auth={
        "method": "plain", "username": CREDENTIALS[0], "password_env": "RELAYD_TEST_PW"})])
    async with running_relay(cfg) as relay:
        qid = await relay.send(MSG, rcpts=RCPTS)
        entry = await wait_until(lambda: _settled(relay, qid), timeout=15, what="a failed attempt")
        assert entry is not None
    # (relayd may have retried meanwhile: the test config's backoff starts at 200 ms)
    attempts = pf.auth.attempts[before:]
    assert attempts and set(attempts) == {("PLAIN", "relay", False)}
    assert _not_handed_over(await _held(pf), qid)
    assert entry.state.value == "queued"
    assert "535" in (entry.last_error or "")  # Postfix: 535 5.7.8 authentication failed
    assert "wrong horse" not in caplog.text


@pytest.fixture(scope="module")
def postfix_limits() -> Iterator[PostfixSmarthost]:
    """STARTTLS and AUTH, two recipients per transaction, one recipient refused by name."""
    main = {"smtpd_recipient_limit": "2",
            "smtpd_recipient_restrictions": "check_recipient_access inline:{ gone@example.net=REJECT }"}
    with PostfixSmarthost(tls=True, credentials=CREDENTIALS, main=main) as pf:
        yield pf


async def test_pipelined_transactions_with_postfix(postfix_limits: PostfixSmarthost) -> None:
    """Postfix offers PIPELINING: MAIL, every RCPT and DATA go in one write after STARTTLS and
    AUTH; a refused recipient, and the 452 past smtpd_recipient_limit whose recipient goes in
    a second transaction on the same connection, are read from the group in order."""
    from relayd.config.schema import AuthConfig, AuthMethod, Smarthost, TlsMode
    from relayd.delivery.smtp.pool import SmarthostPool
    from relayd.model import Status
    from relayd.secrets import Secret

    pf = postfix_limits
    sh = Smarthost(name="postfix", host=pf.host, port=pf.port, tls=TlsMode.STARTTLS,
                   ca_file=pf.ca_file, timeout=5,
                   auth=AuthConfig(method=AuthMethod.PLAIN, username=CREDENTIALS[0],
                                   password=Secret(CREDENTIALS[1])))
    pool = SmarthostPool(sh, hostname="relay.test.example", transcripts=True)
    rcpts = ("one@example.net", "gone@example.net", "two@example.net", "three@example.org")
    try:
        result = await pool.deliver("PIPE1", MSG, "app@example.com", rcpts)
        assert pool.statistics().connections_opened == 1
    finally:
        await pool.aclose()
    assert [o.status for o in result.outcomes] == [Status.SENT, Status.FAILED, Status.SENT, Status.SENT]
    assert result.outcomes[1].reply.code == 554 and "Access denied" in result.outcomes[1].reply.text
    lines = list(result.transcript)
    assert "S: 250-PIPELINING" in lines
    mail = f"C: MAIL FROM:<app@example.com> SIZE={len(MSG)}"
    first = lines.index(mail)
    # The whole group was written before the first reply was read.
    assert lines[first + 1:first + 6] == [*(f"C: RCPT TO:<{r}>" for r in rcpts), "C: DATA"]
    assert [ln[:6] for ln in lines[first + 6:first + 12]] == ["S: 250", "S: 250", "S: 554", "S: 250",
                                                              "S: 452", "S: 354"]
    second = lines.index(mail, first + 1)
    assert lines[second + 1:second + 3] == ["C: RCPT TO:<three@example.org>", "C: DATA"]
    held = {h.recipients: h for h in await _held(pf)}
    assert set(held) == {("one@example.net", "two@example.net"), ("three@example.org",)}
    for h in held.values():  # Postfix adds a Date: to the headers; the body is as sent
        header, body = h.content.split(b"\n\n", 1)
        assert body == MSG.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n")
        assert b"\nSubject: interop\n" in header
    log = await _logged(pf, re.escape("sasl_method=PLAIN, sasl_username=relay"), count=2)
    assert "improper command pipelining" not in log
    assert log.count("sasl_method=PLAIN, sasl_username=relay") == 2
