"""Routing as the operator meets it: `relayd run` as a process with three fake providers,
a `routes:` block, and only SMTP, the `relayd` commands and the log to look at.

Mail from three sender domains to two recipient domains lands exactly where the routes say,
with each provider's own login and the route's DKIM domain; a smarthost at its own cap falls
back or waits as its route says; a SES throttling reply slows the smarthost and the mail goes
later; "try again in 2 seconds" is honoured; a reload changes the route of queued mail.
"""

from __future__ import annotations

import json
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import dkim
import pytest
import yaml

from tests.support.operator import Operator, wait_until
from tests.support.policy_helpers import dkim_keypair
from tests.support.relay import upstream_smarthost
from tests.support.upstream import FakeUpstream, Upstreams

pytestmark = pytest.mark.asyncio

LOGINS = {"ses": ("AKIASES", "ses-pw"), "mailgun": ("postmaster@mg.example.com", "mg-pw"),
          "exchange": ("relay@corp.example.com", "ex-pw")}


def _mail(sender: str, to: str, subject: str = "hello") -> bytes:
    return (f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <{time.time_ns()}@t>\r\n\r\n"
            "body\r\n").encode()


async def _providers(upstream: Upstreams, **replies: Any) -> dict[str, FakeUpstream]:
    fakes = {}
    for name, (login, password) in LOGINS.items():
        fakes[name] = await upstream(auth=["PLAIN", "LOGIN"], credentials={login: password},
                                     require_auth=True, replies=replies.get(name))
    return fakes


def _smarthosts(tmp_path: Path, fakes: dict[str, FakeUpstream],
                **extra: dict[str, Any]) -> list[dict[str, Any]]:
    for name, (_, password) in LOGINS.items():
        (tmp_path / f"{name}.password").write_text(password + "\n")
    return [upstream_smarthost(up, name, auth={"method": "login", "username": LOGINS[name][0],
                                               "password_file": str(tmp_path / f"{name}.password")},
                               **extra.get(name, {}))
            for name, up in fakes.items()]


def _operator(tmp_path: Path, fakes: dict[str, FakeUpstream], extra_hosts: dict[str, Any] | None = None,
              **extra: Any) -> Operator:
    return Operator(tmp_path, _smarthosts(tmp_path, fakes, **(extra_hosts or {})), **extra)


def _verify(data: bytes, public: bytes) -> bytes:
    """The d= of the DKIM signature on ``data`` after checking it with ``public``."""
    assert dkim.verify(data, dnsfunc=lambda name, timeout=5: public), data[:300]
    sig = data.split(b"DKIM-Signature:", 1)[1].split(b"\r\n\r\n")[0]
    return sig.split(b"d=", 1)[1].split(b";", 1)[0].strip()


async def test_three_providers_two_internal_domains(tmp_path: Path, upstream: Upstreams) -> None:
    fakes = await _providers(upstream)
    pem, public = dkim_keypair()
    (tmp_path / "dkim.pem").write_bytes(pem)
    routes = [
        {"name": "internal", "match": {"to_domain": ["corp.example.com", "lab.example.com"]},
         "smarthosts": ["exchange"], "dkim": False},
        {"name": "billing", "match": {"from": ["@billing.example.com"]},
         "smarthosts": ["ses", "mailgun"], "envelope_from": "bounces@billing.example.com",
         "dkim": "billing.example.com"},
        {"name": "marketing", "match": {"from_header_domain": ["news.example.com"]},
         "smarthosts": ["mailgun"]},
    ]
    dkim_keys = [{"domain": d, "selector": "s1", "private_key_file": str(tmp_path / "dkim.pem")}
                 for d in ("billing.example.com", "news.example.com", "shop.example.com")]
    op = _operator(tmp_path, fakes, routes=routes, dkim=dkim_keys)
    await op.start()
    try:
        split_id = await op.send(_mail("pay@billing.example.com", "x@gmail.com"),
                                 sender="pay@billing.example.com",
                                 rcpts=("x@gmail.com", "y@corp.example.com"))
        await op.send(_mail("n@news.example.com", "x@gmail.com"), sender="n@news.example.com",
                      rcpts=("x@gmail.com",))
        await op.send(_mail("app@shop.example.com", "z@lab.example.com"),
                      sender="app@shop.example.com", rcpts=("z@yahoo.com", "z@lab.example.com"))
        await wait_until(lambda: sum(len(f.messages) for f in fakes.values()) == 5, timeout=20,
                         what="five deliveries")
        got = {name: sorted((m.mail_from, tuple(m.rcpt_tos), m.auth_login) for m in f.messages)
               for name, f in fakes.items()}
        assert got == {
            "ses": [("app@shop.example.com", ("z@yahoo.com",), "AKIASES"),
                    ("bounces@billing.example.com", ("x@gmail.com",), "AKIASES")],
            "mailgun": [("n@news.example.com", ("x@gmail.com",), "postmaster@mg.example.com")],
            "exchange": [("app@shop.example.com", ("z@lab.example.com",), "relay@corp.example.com"),
                         ("pay@billing.example.com", ("y@corp.example.com",),
                          "relay@corp.example.com")],
        }
        by_rcpt = {(n, m.rcpt_tos[0]): m.data for n, f in fakes.items() for m in f.messages}
        assert _verify(by_rcpt[("ses", "x@gmail.com")], public) == b"billing.example.com"
        assert _verify(by_rcpt[("mailgun", "x@gmail.com")], public) == b"news.example.com"
        assert _verify(by_rcpt[("ses", "z@yahoo.com")], public) == b"shop.example.com"
        assert b"DKIM-Signature" not in by_rcpt[("exchange", "y@corp.example.com")]

        # The split message: two queue IDs, each with its own route in its log line.
        log = op.log()
        line = next(ln for ln in log.splitlines() if f"{split_id}: routes: " in ln)
        ids = dict(part.split(" route=") for part in line.split(": routes: ")[1].split(", "))
        assert sorted(ids.values()) == ["billing", "internal"]
        # The smarthost has a message before relayd logs its 250: wait for the lines.
        await wait_until(lambda: all(any("status=sent" in ln for ln in op.delivery_lines(q))
                                     for q in ids), what="the delivery lines")
        for qid, route in ids.items():
            (sent,) = [ln for ln in op.delivery_lines(qid) if "status=sent" in ln]
            assert f", route={route}, delay=" in sent
        await wait_until(lambda: "route=default" in op.log(), what="unmatched mail's route=default")

        result = await op.cli("route", "test", "--from", "pay@billing.example.com", "--to",
                              "x@gmail.com", "y@lab.example.com", "--json")
        assert result.code == 0, result.err
        plans = json.loads(result.out)
        assert [(p["route"], [s["name"] for s in p["smarthosts"]]) for p in plans] == [
            ("billing", ["ses", "mailgun"]), ("internal", ["exchange"])]
        assert plans[0]["why"] == "routes[1] (billing): from <pay@billing.example.com>"
        assert "ses-pw" not in result.out and "password" not in result.out

        text = await op.cli("route", "test", "--from", "someone@else.example", "--to", "a@b.example")
        assert "a@b.example: route default (no route matches" in text.out

        explained = await op.cli("explain", "--from", "pay@billing.example.com", "--to",
                                 "x@gmail.com", "y@corp.example.com",
                                 stdin=_mail("pay@billing.example.com", "x@gmail.com").decode())
        assert explained.code == 0, explained.err
        assert "route: billing for x@gmail.com: routes[1] (billing)" in explained.out
        assert "route: internal for y@corp.example.com: routes[0] (internal)" in explained.out
        assert "delivery plan, route billing for x@gmail.com (tried in order, on_cap: wait):" \
            in explained.out
        assert "route billing: dkim: signed d=billing.example.com" in explained.out

        sent = await op.cli("send-test", "--to", "ops@example.net", "--route", "marketing")
        assert sent.code == 0, sent.out + sent.err
        assert fakes["mailgun"].messages[-1].rcpt_tos == ["ops@example.net"]
        assert "mg-pw" not in sent.out
    finally:
        assert await op.stop() == 0


async def test_a_smarthost_at_its_cap_falls_back_or_waits(tmp_path: Path,
                                                         upstream: Upstreams) -> None:
    fakes = await _providers(upstream)
    routes = [{"name": "spill", "match": {"from": ["@a.example.com"]},
               "smarthosts": ["ses", "mailgun"], "on_cap": "next"},
              {"name": "patient", "match": {"from": ["@b.example.com"]}, "smarthosts": ["ses"],
               "on_cap": "wait"}]
    op = _operator(tmp_path, fakes, {"ses": {"daily_cap": 1}}, routes=routes)
    await op.start()
    try:
        await op.send(_mail("x@a.example.com", "r@example.net"), sender="x@a.example.com")
        await wait_until(lambda: len(fakes["ses"].messages) == 1, timeout=20, what="first via ses")
        await op.send(_mail("x@a.example.com", "r@example.net"), sender="x@a.example.com")
        await wait_until(lambda: len(fakes["mailgun"].messages) == 1, timeout=20,
                         what="second spills to mailgun")
        waiting = await op.send(_mail("x@b.example.com", "r@example.net"), sender="x@b.example.com")
        row = await op.wait_entry(waiting, "waiting for the cap",
                                  lambda r: "daily_cap" in (r["last_error"] or ""))
        assert row["attempts"] == 0 and row["state"] == "queued" and row["next_attempt"]
        assert len(fakes["ses"].messages) == 1 and len(fakes["mailgun"].messages) == 1
    finally:
        assert await op.stop() == 0


async def test_ses_throttling_slows_the_smarthost_and_the_mail_goes_later(
        tmp_path: Path, upstream: Upstreams) -> None:
    throttled = "454 Throttling failure: Maximum sending rate exceeded."
    fakes = await _providers(upstream, ses={"mail": [throttled]})
    routes = [{"name": "billing", "match": {"from": ["@billing.example.com"]},
               "smarthosts": ["ses"]}]
    op = _operator(tmp_path, fakes, routes=routes)
    await op.start()
    try:
        qid = await op.send(_mail("x@billing.example.com", "r@example.net"),
                            sender="x@billing.example.com")
        await wait_until(lambda: len(fakes["ses"].messages) == 1, timeout=20, what="delivery later")
        lines = op.delivery_lines(qid)
        assert "status=deferred" in lines[0] and "Throttling failure" in lines[0]
        assert ", route=billing, " in lines[0] and "attempts=1" in lines[0]
        await wait_until(lambda: any("status=sent" in ln for ln in op.delivery_lines(qid)),
                         what="the sent line")
        assert "attempts=2" in op.delivery_lines(qid)[-1]
        log = op.log()
        assert "slowed down to" in log
        assert "paused" not in log  # slowed, not paused: the other mail keeps flowing
    finally:
        assert await op.stop() == 0


async def test_try_again_in_n_seconds_is_honoured(tmp_path: Path, upstream: Upstreams) -> None:
    fakes = await _providers(upstream, mailgun={"dot": ["451 4.7.1 Please try again in 2 seconds"]})
    routes = [{"name": "mail", "match": {}, "smarthosts": ["mailgun"]}]
    op = _operator(tmp_path, fakes, routes=routes)
    await op.start()
    try:
        before = time.time()
        qid = await op.send(_mail("x@example.com", "r@example.net"), sender="x@example.com")
        row = await op.wait_entry(qid, "the deferral", lambda r: r["attempts"] == 1)
        due = datetime.fromisoformat(row["next_attempt"]).timestamp()
        assert due - before >= 1.0  # the backoff alone (spool.retry.max_interval) is at most 1s
        await wait_until(lambda: len(fakes["mailgun"].messages) == 1, timeout=20, what="delivery")
        assert "next attempt in 2s" in op.delivery_lines(qid)[0]
    finally:
        assert await op.stop() == 0


async def test_a_reload_changes_the_route_of_queued_mail(tmp_path: Path,
                                                         upstream: Upstreams) -> None:
    fakes = await _providers(upstream, ses={"mail": "451 4.3.0 try again later"})
    routes = [{"name": "billing", "match": {"from": ["@billing.example.com"]},
               "smarthosts": ["ses"]}]
    op = _operator(tmp_path, fakes, routes=routes)
    await op.start()
    try:
        qid = await op.send(_mail("x@billing.example.com", "r@example.net"),
                            sender="x@billing.example.com")
        row = await op.wait_entry(qid, "a deferral", lambda r: r["attempts"] >= 1)
        assert row["route"] == "billing"
        shown = await op.cli("queue", "show", qid)
        assert "route:        billing" in shown.out
        data = yaml.safe_load(op.config.read_text())
        data["routes"][0]["smarthosts"] = ["exchange"]
        op.write(yaml.safe_dump(data))
        op.relay.signal(signal.SIGHUP)
        await wait_until(lambda: len(fakes["exchange"].messages) == 1, timeout=20,
                         what="the queued message through the changed route")
        assert not fakes["ses"].messages
        await wait_until(lambda: any("status=sent" in ln for ln in op.delivery_lines(qid)),
                         what="the sent line")
        sent = [ln for ln in op.delivery_lines(qid) if "status=sent" in ln]
        assert sent and "relay=exchange[" in sent[0] and "route=billing" in sent[0]
    finally:
        assert await op.stop() == 0
