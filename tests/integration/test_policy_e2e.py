"""The sending policy through the real daemon and a fake upstream: what the provider
receives, what the do-not-email list and the daily cap do to queued mail, DKIM that verifies."""

from __future__ import annotations

import asyncio
import email
import logging
import re
import urllib.request
from email import policy as email_policy
from pathlib import Path

import aiosmtplib
import dkim
import pytest

from relayd.cli import main as cli_main
from relayd.model import State
from tests.support.policy_helpers import dkim_keypair
from tests.support.relay import free_port, running_relay, upstream_smarthost, wait_until, write_config
from tests.support.upstream import FakeUpstream

MSG = (b"From: App <app@example.com>\r\nTo: user@example.net\r\nSubject: Your invoice\r\n"
       b"X-Mailer: LegacyApp 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello,\r\nyour invoice.\r\n")


async def test_rewrites_headers_and_envelope_reach_the_provider(tmp_path: Path) -> None:
    async with FakeUpstream() as up:
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")],
                           sender={"from": {"address": "noreply@example.com", "name": "Example, Inc.", "mode": "always"},
                                   "reply_to": {"address": "support@example.com", "name": "Support"},
                                   "envelope_from": "bounces@example.com"},
                           headers={"add": {"X-SES-CONFIGURATION-SET": "transactional"}, "remove": ["X-Mailer"]})
        async with running_relay(cfg) as relay:
            await relay.send(MSG)
            await wait_until(lambda: len(up.messages) == 1, what="delivery")
    got = up.messages[0]
    assert got.mail_from == "bounces@example.com"
    parsed = email.message_from_bytes(got.data, policy=email_policy.default)
    assert parsed.get_all("From") == ['"Example, Inc." <noreply@example.com>']
    assert b"app@example.com" not in got.data.split(b"\r\n\r\n", 1)[0].split(b"Received:")[0]
    assert parsed["Reply-To"] == "Support <support@example.com>"
    assert parsed["X-SES-CONFIGURATION-SET"] == "transactional"
    assert "X-Mailer" not in parsed
    assert got.data.endswith(b"\r\n\r\nHello,\r\nyour invoice.\r\n")


async def test_do_not_email_drop_and_suppress_commands_on_a_running_daemon(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with FakeUpstream() as up:
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")],
                           priority=[{"subject": "(?i)password reset"}])
        async with running_relay(cfg) as relay:
            assert cli_main(["-c", str(cfg), "suppress", "add", "Blocked@Example.NET"]) == 0
            qid = await relay.send(MSG, rcpts=("blocked@example.net", "ok@example.net"))
            await wait_until(lambda: len(up.messages) == 1, what="delivery to the allowed recipient")
            # Priority mail bypasses the list (priority_bypass defaults to true).
            await relay.send(MSG.replace(b"Your invoice", b"Password reset"), rcpts=("blocked@example.net",))
            await wait_until(lambda: len(up.messages) == 2, what="priority delivery")
            assert cli_main(["-c", str(cfg), "suppress", "remove", "blocked@example.net"]) == 0
            await relay.send(MSG, rcpts=("blocked@example.net",))
            await wait_until(lambda: len(up.messages) == 3, what="delivery after removal")
    assert up.messages[0].rcpt_tos == ["ok@example.net"]
    assert up.messages[1].rcpt_tos == ["blocked@example.net"]
    assert any(f"{qid}: to=<blocked@example.net>" in r.getMessage() and "status=suppressed" in r.getMessage()
               for r in caplog.records)


async def test_do_not_email_reject_answers_550_at_rcpt(tmp_path: Path) -> None:
    async with FakeUpstream() as up:
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")], do_not_email={"action": "reject"})
        async with running_relay(cfg) as relay:
            assert cli_main(["-c", str(cfg), "suppress", "add", "gone@example.net"]) == 0
            with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as info:
                await relay.send(MSG, rcpts=("gone@example.net",))
    assert info.value.recipients[0].code == 550
    assert up.messages == []


async def test_list_change_while_mail_waits_is_applied_at_delivery(tmp_path: Path) -> None:
    async with FakeUpstream(replies={"mail": "451 4.3.0 mailbox busy"}) as up:
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")])
        async with running_relay(cfg) as relay:
            qid = await relay.send(MSG, rcpts=("later@example.net",))
            await wait_until(lambda: relay.daemon.spool.get(qid).attempts >= 1, what="first attempt")
            assert cli_main(["-c", str(cfg), "suppress", "add", "later@example.net"]) == 0
            up.replies = {}
            await wait_until(lambda: relay.daemon.spool.list() == [], what="message settled")
    assert up.messages == []


async def test_hard_bounce_joins_the_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with FakeUpstream(replies={"rcpt": {"nobody@example.net": "550 5.1.1 no such user"}}) as up:
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")], do_not_email={"auto_add": ["hard_bounce"]})
        async with running_relay(cfg) as relay:
            await relay.send(MSG, rcpts=("nobody@example.net",))
            await wait_until(lambda: relay.daemon.spool.list(State.FAILED) != [], what="failure")
    capsys.readouterr()
    assert cli_main(["-c", str(cfg), "suppress", "list", "--json"]) == 0
    assert "nobody@example.net" in capsys.readouterr().out


async def test_footer_list_unsubscribe_per_recipient_and_one_click(tmp_path: Path) -> None:
    port = free_port()
    async with FakeUpstream() as up:
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")],
                           unsubscribe={"url": f"http://127.0.0.1:{port}/unsubscribe?token={{token}}",
                                        "mailto": "unsubscribe@example.com", "secret": "s3cret-for-tests",
                                        "footer_text": "Unsubscribe: {url}", "http_listen": f"127.0.0.1:{port}"},
                           do_not_email={"auto_add": ["unsubscribe"]})
        async with running_relay(cfg) as relay:
            await relay.send(MSG, rcpts=("a@example.net", "b@example.net"))
            await wait_until(lambda: len(up.messages) == 2, what="one copy per recipient")
            by_rcpt = {m.rcpt_tos[0]: email.message_from_bytes(m.data, policy=email_policy.default) for m in up.messages}
            urls = {}
            for rcpt, parsed in by_rcpt.items():
                header = parsed["List-Unsubscribe"]
                assert "mailto:unsubscribe@example.com" in header
                assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
                url = re.search(r"<(http[^>]+)>", header).group(1)  # type: ignore[union-attr]
                body = parsed.get_body(("plain",)).get_content()  # type: ignore[union-attr]
                assert body.count("Unsubscribe: ") == 1 and url in body and "your invoice." in body
                urls[rcpt] = url
            assert urls["a@example.net"] != urls["b@example.net"]
            # GET only shows a page (link scanners must not unsubscribe anyone).
            page = await asyncio.to_thread(lambda: urllib.request.urlopen(urls["a@example.net"], timeout=5).read())
            assert b"<form" in page and b'method="post"' in page.lower()
            assert relay.daemon.accepting.policy.store.contains("a@example.net") is False
            req = urllib.request.Request(urls["a@example.net"], data=b"List-Unsubscribe=One-Click", method="POST")
            status = await asyncio.to_thread(lambda: urllib.request.urlopen(req, timeout=5).status)
            assert status == 200
            await relay.send(MSG, rcpts=("a@example.net", "b@example.net"))
            await wait_until(lambda: len(up.messages) == 3, what="delivery after unsubscribe")
    assert up.messages[2].rcpt_tos == ["b@example.net"]


async def test_dkim_signature_verifies_at_the_receiver(tmp_path: Path) -> None:
    pem, txt = dkim_keypair()
    (tmp_path / "dkim.pem").write_bytes(pem)
    async with FakeUpstream() as up:
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")],
                           dkim=[{"domain": "example.com", "selector": "relayd", "private_key_file": str(tmp_path / "dkim.pem")}],
                           headers={"add": {"X-Extra": "1"}})
        async with running_relay(cfg) as relay:
            await relay.send(MSG)
            await wait_until(lambda: len(up.messages) == 1, what="delivery")
    data = up.messages[0].data
    assert b"DKIM-Signature:" in data

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"relayd._domainkey.example.com."
        return txt
    assert dkim.verify(data, dnsfunc=dnsfunc)


async def test_daily_cap_holds_exactly_n_and_releases_the_rest_later(tmp_path: Path) -> None:
    # A 3-second rolling window stands in for 24 hours.
    async with FakeUpstream() as up:
        cfg = write_config(tmp_path, [upstream_smarthost(up, tls="none")], limits={"daily_cap": 2})
        async with running_relay(cfg, cap_window=3.0) as relay:
            for n in range(3):
                await relay.send(MSG, rcpts=(f"r{n}@example.net",))
            await wait_until(lambda: len(up.messages) == 2, what="two deliveries")
            await wait_until(lambda: any("daily_cap" in (e.last_error or "") for e in relay.daemon.spool.list()),
                             what="the third waits for the cap")
            assert len(up.messages) == 2 and relay.daemon.spool.list(State.FAILED) == []
            await wait_until(lambda: len(up.messages) == 3, timeout=15, what="release when the window frees")
    assert sorted(m.rcpt_tos[0] for m in up.messages) == ["r0@example.net", "r1@example.net", "r2@example.net"]
