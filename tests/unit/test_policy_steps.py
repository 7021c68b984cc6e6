"""Each policy step on its own: priority, do-not-email, rewrite, headers, unsubscribe, DKIM."""

from __future__ import annotations

import time

import dkim
import pytest

from relayd.model import Envelope
from relayd.policy import _mime
from relayd.policy.pipeline import build_policy, rcpt_decision, recheck_at_delivery, steps_in_order
from relayd.policy.records import PolicyContext
from relayd.policy.unsubscribe import make_token, verify_token
from tests.support.policy_helpers import config, dkim_keypair, eml, message, parse, run

SIMPLE = (b"From: App <app@example.com>\r\nTo: alice@example.net\r\nSubject: Hello\r\n"
          b"Date: Sat, 21 Nov 2026 10:00:00 +0000\r\nMessage-ID: <m1@example.com>\r\n"
          b"X-Mailer: LegacyApp 1.0\r\n\r\nBody line\r\n")


def headers(content: bytes) -> _mime.Headers:
    return _mime.Headers.parse(_mime.split_message(content)[0])


def test_steps_run_in_spec_order() -> None:
    assert [name for name, _ in steps_in_order()] == ["priority", "do_not_email", "rewrite", "headers",
                                           "unsubscribe", "long_lines", "dkim"]


# -- priority ------------------------------------------------------------------------------

@pytest.mark.parametrize(("rules", "content", "mail_from", "expected"), [
    ('[{subject: "(?i)password reset"}]', eml("php_mail.eml"), "www@example.com", True),
    ('[{subject: "(?i)password reset"}]', SIMPLE, "app@example.com", False),
    ('[{header: X-Priority, pattern: "^1"}]', SIMPLE.replace(b"Subject", b"X-Priority: 1 (Highest)\r\nSubject"),
     "app@example.com", True),
    ('[{header: X-Priority, pattern: "^1"}]', SIMPLE.replace(b"Subject", b"X-Priority: 3\r\nSubject"),
     "app@example.com", False),
    ('[{sender: "^alerts@"}]', SIMPLE, "alerts@example.com", True),
    ('[{subject: "Bestellung"}]', eml("html_only.eml"), "shop@example.com", True),  # RFC 2047 decoded
])
def test_priority_rules(rules: str, content: bytes, mail_from: str, expected: bool) -> None:
    result = run(config(f"priority: {rules}"), message(content, mail_from=mail_from))
    assert result.priority is expected
    assert result.outputs[0].envelope.priority is expected
    if expected:
        assert result.why_priority and result.why_priority.startswith("priority[0]")


@pytest.mark.parametrize(("value", "expected"), [(b"high", True), (b"HIGH", True), (b"low", False)])
def test_internal_priority_header_marks_and_is_removed(value: bytes, expected: bool) -> None:
    content = SIMPLE.replace(b"Subject", b"X-Relayd-Priority: " + value + b"\r\nSubject")
    result = run(config(), message(content))
    assert result.priority is expected
    assert b"X-Relayd-Priority" not in result.outputs[0].content


# -- do-not-email --------------------------------------------------------------------------

RCPTS = ("Alice@Example.net", "bob@example.net")
LISTED = frozenset({"alice@example.net"})


def test_drop_accepts_but_never_delivers_listed_recipients() -> None:
    result = run(config(), message(SIMPLE, rcpts=RCPTS), suppressed=LISTED)
    assert result.suppressed == ("Alice@Example.net",)
    assert [m.envelope.rcpt_tos for m in result.outputs] == [("bob@example.net",)]


def test_every_recipient_listed_leaves_nothing_to_spool() -> None:
    result = run(config(), message(SIMPLE, rcpts=("alice@example.net",)), suppressed=LISTED)
    assert result.outputs == ()
    assert result.suppressed == ("alice@example.net",)


def test_reject_action_rejects_at_rcpt() -> None:
    cfg = config("do_not_email: {action: reject}")
    policy = build_policy(cfg, {})
    ctx = PolicyContext(now=0, suppressed=LISTED)
    reply = rcpt_decision(policy, "app@example.com", "ALICE@example.net", ctx)
    assert reply is not None and reply.code == 550 and reply.dsn == "5.7.1"
    assert rcpt_decision(policy, "app@example.com", "bob@example.net", ctx) is None
    result = run(cfg, message(SIMPLE, rcpts=RCPTS), suppressed=LISTED)
    assert result.rejected == ("Alice@Example.net",)
    # a drop list never rejects at RCPT time
    assert rcpt_decision(build_policy(config(), {}), "a@b.c", "alice@example.net", ctx) is None


def test_priority_bypass_and_bypass_all() -> None:
    prio = message(SIMPLE.replace(b"Subject", b"X-Relayd-Priority: high\r\nSubject"), rcpts=RCPTS)
    assert run(config(), prio, suppressed=LISTED).suppressed == ()
    assert run(config("do_not_email: {priority_bypass: false}"), prio,
               suppressed=LISTED).suppressed == ("Alice@Example.net",)
    result = run(config("do_not_email: {bypass_all: true}"), message(SIMPLE, rcpts=RCPTS),
                 suppressed=LISTED)
    assert result.suppressed == () and result.outputs[0].envelope.rcpt_tos == RCPTS
    cfg = config('do_not_email: {action: reject}\npriority: [{sender: "^alerts@"}]')
    ctx = PolicyContext(now=0, suppressed=LISTED)
    assert rcpt_decision(build_policy(cfg, {}), "alerts@example.com", "alice@example.net", ctx) is None


def test_recheck_at_delivery_sees_list_changes() -> None:
    policy = build_policy(config(), {})
    env = Envelope("app@example.com", RCPTS)
    assert recheck_at_delivery(policy, env, PolicyContext(0)) == (RCPTS, ())
    assert recheck_at_delivery(policy, env, PolicyContext(0, LISTED)) == (
        ("bob@example.net",), ("Alice@Example.net",))
    prio = Envelope("app@example.com", RCPTS, priority=True)
    assert recheck_at_delivery(policy, prio, PolicyContext(0, LISTED)) == (RCPTS, ())


# -- rewrite -------------------------------------------------------------------------------

def test_from_always_leaves_exactly_one_and_conceals_the_original() -> None:
    content = SIMPLE.replace(b"Subject", b"Sender: app-daemon@internal.example.com\r\n"
                             b"Return-Path: <app@internal.example.com>\r\nSubject")
    cfg = config('sender: {from: {address: noreply@example.com, name: "Example", mode: always}}')
    out = run(cfg, message(content, mail_from="app@internal.example.com")).outputs[0]
    assert headers(out.content).get_all("From") == ["Example <noreply@example.com>"]
    assert b"app@example.com" not in out.content
    assert b"internal.example.com" not in out.content
    assert out.envelope.mail_from == "noreply@example.com"


def test_from_missing_adds_only_when_absent() -> None:
    cfg = config("sender: {from: {address: noreply@example.com}}")
    out = run(cfg, message(SIMPLE)).outputs[0].content
    assert headers(out).get_all("From") == ["App <app@example.com>"]
    bare = SIMPLE.replace(b"From: App <app@example.com>\r\n", b"")
    out = run(cfg, message(bare)).outputs[0].content
    assert headers(out).get_all("From") == ["noreply@example.com"]


@pytest.mark.parametrize(("name", "shown", "decoded"), [
    ("Example", "Example <noreply@example.com>", "Example"),
    ("Doe, John", '"Doe, John" <noreply@example.com>', "Doe, John"),
    ('The "Best" Shop', '"The \\"Best\\" Shop" <noreply@example.com>', 'The "Best" Shop'),
    ("Jörg Müller, GmbH", None, "Jörg Müller, GmbH"),
    ("Jörg Müller, GmbH — Abteilung für sehr lange Namen und noch mehr", None,
     "Jörg Müller, GmbH — Abteilung für sehr lange Namen und noch mehr"),
])
def test_display_names_are_encoded(name: str, shown: str | None, decoded: str) -> None:
    cfg = config(f"sender: {{reply_to: {{address: noreply@example.com, name: '{name}', mode: always}}}}")
    out = run(cfg, message(SIMPLE)).outputs[0].content
    raw = headers(out).get("Reply-To")
    assert raw is not None and raw.isascii()
    assert all(len(line) <= 78 for line in _mime.split_message(out)[0].split(b"\r\n"))
    if shown:
        assert raw == shown
    addr = parse(out)["Reply-To"].addresses[0]
    assert addr.display_name == decoded and addr.addr_spec == "noreply@example.com"


def test_envelope_from_and_null_sender() -> None:
    cfg = config("sender: {envelope_from: bounces@example.com}")
    assert run(cfg, message(SIMPLE)).outputs[0].envelope.mail_from == "bounces@example.com"
    assert run(cfg, message(SIMPLE, mail_from="")).outputs[0].envelope.mail_from == ""


# -- headers -------------------------------------------------------------------------------

def test_headers_add_and_remove() -> None:
    cfg = config("headers: {add: {X-SES-CONFIGURATION-SET: transactional, X-Mailer: relayd}, "
                 "remove: [x-mailer]}")
    h = headers(run(cfg, message(SIMPLE)).outputs[0].content)
    assert h.get_all("X-Mailer") == ["relayd"]
    assert h.get_all("X-SES-Configuration-Set") == ["transactional"]


def test_non_ascii_added_header_is_rfc2047_encoded() -> None:
    out = run(config("headers: {add: {X-Campaign: 'Grüße 2026'}}"), message(SIMPLE)).outputs[0].content
    assert headers(out).get("X-Campaign") == "=?utf-8?q?Gr=C3=BC=C3=9Fe?= 2026"
    assert str(parse(out)["X-Campaign"]) == "Grüße 2026"


# -- unsubscribe ---------------------------------------------------------------------------

UNSUB = """
unsubscribe:
  url: "https://example.com/unsubscribe?token={token}"
  mailto: unsubscribe@example.com
  secret: s3cret
  footer_text: "Unsubscribe: {url}"
"""


def test_per_recipient_copies_carry_their_own_token() -> None:
    result = run(config(UNSUB), message(SIMPLE, rcpts=("a@example.net", "B@example.net")))
    assert [m.envelope.rcpt_tos for m in result.outputs] == [("a@example.net",), ("B@example.net",)]
    for m in result.outputs:
        rcpt = m.envelope.rcpt_tos[0]
        token = make_token(b"s3cret", rcpt)
        h = headers(m.content)
        assert h.get("List-Unsubscribe") == (
            f"<mailto:unsubscribe@example.com?subject=unsubscribe>, "
            f"<https://example.com/unsubscribe?token={token}>")
        assert h.get("List-Unsubscribe-Post") == "List-Unsubscribe=One-Click"
        assert f"Unsubscribe: https://example.com/unsubscribe?token={token}".encode() in m.content
        assert verify_token(b"s3cret", token) == rcpt.lower()


def test_static_unsubscribe_keeps_one_copy() -> None:
    cfg = config("unsubscribe: {mailto: unsubscribe@example.com, footer_text: 'Reply STOP: {url}'}")
    result = run(cfg, message(SIMPLE, rcpts=("a@example.net", "b@example.net")))
    assert len(result.outputs) == 1
    h = headers(result.outputs[0].content)
    assert h.get("List-Unsubscribe") == "<mailto:unsubscribe@example.com?subject=unsubscribe>"
    assert not h.has("List-Unsubscribe-Post")  # RFC 8058 needs an HTTPS URI


def test_skip_priority() -> None:
    prio = message(SIMPLE.replace(b"Subject", b"X-Relayd-Priority: high\r\nSubject"))
    out = run(config(UNSUB), prio).outputs[0].content
    assert b"List-Unsubscribe" not in out and b"Unsubscribe:" not in out
    out = run(config(UNSUB + "  skip_priority: false\n"), prio).outputs[0].content
    assert b"List-Unsubscribe" in out


@pytest.mark.parametrize("token", ["", "abc", "YUBiLmNvbQ.AAAA", make_token(b"other", "a@b.com"),
                                   make_token(b"s3cret", "a@b.com")[:-2] + "xx"])
def test_forged_tokens_do_not_verify(token: str) -> None:
    assert verify_token(b"s3cret", token) is None


# -- DKIM ----------------------------------------------------------------------------------

def _dnsfunc(name: bytes, timeout: int = 5) -> bytes:
    assert name == b"relayd._domainkey.example.com."
    return dkim_keypair()[1]


def test_dkim_signs_last_and_verifies() -> None:
    pem, _ = dkim_keypair()
    cfg = config(UNSUB + "dkim: [{domain: example.com, selector: relayd, private_key_file: k.pem}]")
    # t= is the policy's clock (PolicyContext.now); dkimpy refuses a t= in the future.
    result = run(cfg, message(eml("mixed_pdf.eml"), rcpts=("erin@example.net",)),
                 keys={"example.com": pem}, now=time.time())
    out = result.outputs[0].content
    assert out.startswith(b"DKIM-Signature:")
    assert dkim.verify(out, dnsfunc=_dnsfunc)
    sig = parse(out)["DKIM-Signature"]
    signed = {h.strip().lower() for h in str(sig).split("h=")[1].split(";")[0].split(":")}
    assert {"from", "to", "subject", "date", "message-id", "list-unsubscribe",
            "list-unsubscribe-post"} <= signed
    tampered = out.replace(b"Invoice 2026-11", b"Invoice 2026-12")
    assert not dkim.verify(tampered, dnsfunc=_dnsfunc)


def test_dkim_needs_the_from_domain() -> None:
    pem, _ = dkim_keypair()
    cfg = config("dkim: [{domain: other.example, selector: s, private_key_file: k.pem}]")
    result = run(cfg, message(SIMPLE), keys={"other.example": pem})
    assert not result.outputs[0].content.startswith(b"DKIM-Signature")
    assert any("no dkim entry for From domain example.com" in n.text for n in result.steps)


def test_log_summary_names_what_happened() -> None:
    from relayd.policy.pipeline import log_summary

    cfg = config(UNSUB + "sender: {from: {address: noreply@example.com, mode: always}}")
    result = run(cfg, message(SIMPLE, rcpts=("a@example.net", "b@example.net")),
                 suppressed=frozenset({"b@example.net"}))
    assert log_summary(result) == "policy=suppressed=1,rewrite,footer,list-unsubscribe"
    assert log_summary(run(config(), message(SIMPLE))) == "policy=none"
