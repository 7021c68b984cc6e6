"""Delivery with RFC 2920 command pipelining: MAIL, every RCPT and DATA in one write, the
replies read in order, then the body. Against the fake upstream on loopback, on asyncio's
and uvloop's transports, in clear text, after STARTTLS and over implicit TLS."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import uvloop

from relayd.config.schema import AuthConfig, AuthMethod, Smarthost
from relayd.delivery.smtp.pool import SmarthostPool
from relayd.model import DeliveryResult, Status
from relayd.secrets import Secret
from tests.support.upstream import FakeUpstream

MSG = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nHello.\r\n.dot line\r\n"
PASSWORD = "s3cret-Pa55word"
T = TypeVar("T")
Runner = Callable[[Callable[[], Awaitable[Any]]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def on_loop(request: pytest.FixtureRequest) -> Iterator[Runner]:
    """Runs a scenario on a fresh event loop of the kind given (relayd runs on uvloop)."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def run(scenario: Callable[[], Awaitable[T]]) -> T:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(scenario())  # type: ignore[arg-type]
    yield run


async def deliver(sh: Smarthost, rcpts: tuple[str, ...] = ("b@example.net",),
                  content: bytes = MSG, mail_from: str = "a@example.com", **kw: Any) -> DeliveryResult:
    pool = SmarthostPool(sh, hostname="relay.test", **kw)
    try:
        return await pool.deliver("Q1", content, mail_from, rcpts)
    finally:
        await pool.aclose()


def rcpt_lines(*rcpts: str) -> list[str]:
    return [f"RCPT TO:<{r}>" for r in rcpts]


def transaction_commands(up: FakeUpstream) -> list[str]:
    return [c for c in up.commands if not c.startswith(("EHLO", "QUIT", "STARTTLS", "AUTH"))]


# -- the group is one write ---------------------------------------------------------------------

@pytest.mark.parametrize("tls", ["none", "starttls", "implicit"])
def test_mail_rcpts_and_data_arrive_before_any_reply(on_loop: Runner, tls: str) -> None:
    async def scenario() -> None:
        async with FakeUpstream(tls=tls, pipelining=True, auth=("PLAIN",),
                                credentials={"relay": PASSWORD}, require_auth=True) as up:
            auth = AuthConfig(method=AuthMethod.PLAIN, username="relay", password=Secret(PASSWORD))
            pool = SmarthostPool(up.smarthost(auth=auth), hostname="relay.test")
            one = await pool.deliver("Q1", MSG, "a@example.com", ["b@example.net"])
            rcpts = ("r1@example.net", "r2@example.net", "r3@example.net")
            several = await pool.deliver("Q2", MSG, "a@example.com", rcpts)
            await pool.aclose()
            assert one.delivered == ("b@example.net",) and several.delivered == rcpts
            assert not one.smarthost_fault and not several.smarthost_fault
            # When the server began on MAIL, before it replied, the rest had arrived.
            assert up.waiting_at_mail == [[*rcpt_lines("b@example.net"), "DATA"],
                                          [*rcpt_lines(*rcpts), "DATA"]]
            assert [m.data for m in up.messages] == [MSG, MSG]
            assert [m.rcpt_tos for m in up.messages] == [["b@example.net"], list(rcpts)]
            assert all(m.tls is (tls != "none") and m.auth_login == "relay" for m in up.messages)
            assert up.connections == 1  # the session is reused after a pipelined transaction
    on_loop(scenario)


def test_without_pipelining_each_command_waits_for_its_reply(on_loop: Runner) -> None:
    async def scenario() -> None:
        async with FakeUpstream(pipelining=False) as up:
            rcpts = ("r1@example.net", "r2@example.net")
            result = await deliver(up.smarthost(), rcpts)
            assert result.delivered == rcpts
            assert up.waiting_at_mail == [[]]
            assert transaction_commands(up) == ["MAIL FROM:<a@example.com>", *rcpt_lines(*rcpts), "DATA"]
            assert up.messages[0].data == MSG
    on_loop(scenario)


def test_pipelining_false_waits_for_each_reply_although_the_server_offers_it(on_loop: Runner) -> None:
    """smarthosts[].pipelining: false, for a server that offers PIPELINING and mishandles it."""
    async def scenario() -> None:
        async with FakeUpstream(pipelining=True) as up:
            rcpts = ("r1@example.net", "r2@example.net")
            result = await deliver(up.smarthost(pipelining=False), rcpts)
            assert result.delivered == rcpts
            assert up.waiting_at_mail == [[]]  # nothing sent before MAIL was answered
            assert transaction_commands(up) == ["MAIL FROM:<a@example.com>", *rcpt_lines(*rcpts), "DATA"]
            assert up.messages[0].data == MSG
    on_loop(scenario)


async def test_esmtp_parameters_go_in_the_group() -> None:
    content = b"Subject: caf\xc3\xa9\r\n\r\n8-bit \xe2\x82\xac body\r\n"
    async with FakeUpstream(pipelining=True, size_limit=10_000) as up:
        result = await deliver(up.smarthost(), ("pelé@example.net",), content=content)
        assert result.delivered == ("pelé@example.net",)
        assert up.commands[1] == f"MAIL FROM:<a@example.com> SIZE={len(content)} BODY=8BITMIME SMTPUTF8"
        assert up.waiting_at_mail == [[*rcpt_lines("pelé@example.net"), "DATA"]]
        assert up.messages[0].data == content
    async with FakeUpstream(pipelining=True, size_limit=20) as up:
        result = await deliver(up.smarthost())
        assert result.failed == ("b@example.net",) and result.outcomes[0].dsn == "5.3.4"
        assert transaction_commands(up) == []
    async with FakeUpstream(pipelining=True, smtputf8=False) as up:
        result = await deliver(up.smarthost(), ("pelé@example.net",))
        assert result.failed == ("pelé@example.net",) and result.outcomes[0].dsn == "5.6.7"
        assert transaction_commands(up) == []


async def test_a_recipient_with_a_line_break_is_refused_and_left_out_of_the_group() -> None:
    async with FakeUpstream(pipelining=True) as up:
        result = await deliver(up.smarthost(), ("x@example.net>\r\nRSET", "b@example.net"))
        assert [o.status for o in result.outcomes] == [Status.FAILED, Status.SENT]
        assert result.outcomes[0].dsn == "5.1.3"
        assert up.waiting_at_mail == [[*rcpt_lines("b@example.net"), "DATA"]]
        assert "RSET" not in up.commands


# -- per-recipient and message-level replies -----------------------------------------------------

def test_mixed_recipient_replies(on_loop: Runner) -> None:
    async def scenario() -> None:
        replies = {"rcpt": {"later@example.net": "450 4.2.1 mailbox busy",
                            "gone@example.net": "550 5.1.1 user unknown",
                            "fwd@example.net": "251 2.1.5 user not local; will forward"}}
        async with FakeUpstream(pipelining=True, replies=replies) as up:
            rcpts = ("ok@example.net", "later@example.net", "gone@example.net", "fwd@example.net")
            result = await deliver(up.smarthost(), rcpts)
            assert [o.status for o in result.outcomes] == [Status.SENT, Status.DEFERRED,
                                                           Status.FAILED, Status.SENT]
            assert [o.dsn for o in result.outcomes] == ["2.0.0", "4.2.1", "5.1.1", "2.0.0"]
            assert not result.smarthost_fault
            assert up.waiting_at_mail == [[*rcpt_lines(*rcpts), "DATA"]]
            # 251 is a reply the fake only scripts: the server itself kept just ok@.
            assert up.messages[0].rcpt_tos == ["ok@example.net"]
    on_loop(scenario)


@pytest.mark.parametrize(("reply", "status", "fault"), [
    ("550 5.7.1 sender rejected", Status.FAILED, False),
    ("451 4.3.0 local error in processing", Status.DEFERRED, False),
    ("421 4.7.0 Try again later, closing connection.", Status.DEFERRED, True),
])
async def test_mail_rejected_settles_everyone_with_the_mail_reply(reply: str, status: Status,
                                                                  fault: bool) -> None:
    async with FakeUpstream(pipelining=True, replies={"mail": [reply]}) as up:
        pool = SmarthostPool(up.smarthost(), hostname="relay.test", transcripts=True)
        rcpts = ("a@example.net", "b@example.net")
        result = await pool.deliver("Q1", MSG, "a@example.com", rcpts)
        assert [o.status for o in result.outcomes] == [status, status]
        assert all(str(o.reply) == reply for o in result.outcomes)  # not the 503s after it
        assert result.smarthost_fault is fault
        assert up.messages == []
        if not reply.startswith("421"):
            # The RCPTs and DATA were answered (503) and read, then RSET: the session goes on.
            assert [ln.split(" ", 2)[1][:1] for ln in result.transcript if ln.startswith("S: ")][-4:] \
                == ["5", "5", "5", "2"]
            assert transaction_commands(up) == ["MAIL FROM:<a@example.com>", *rcpt_lines(*rcpts),
                                                "DATA", "RSET"]
        again = await pool.deliver("Q2", MSG, "a@example.com", rcpts)
        assert again.delivered == rcpts
        assert up.connections == (2 if reply.startswith("421") else 1)
        await pool.aclose()


async def test_no_recipient_accepted_sends_no_body() -> None:
    replies = {"rcpt": {"a@example.net": "550 5.1.1 unknown", "b@example.net": "450 4.2.0 later"}}
    async with FakeUpstream(pipelining=True, replies=replies) as up:
        pool = SmarthostPool(up.smarthost(), hostname="relay.test", transcripts=True)
        result = await pool.deliver("Q1", MSG, "a@example.com", ("a@example.net", "b@example.net"))
        assert [o.status for o in result.outcomes] == [Status.FAILED, Status.DEFERRED]
        assert [o.reply.code for o in result.outcomes] == [550, 450]
        assert not result.smarthost_fault
        assert up.messages == []
        assert "S: 503 Error: need RCPT command" in result.transcript  # DATA refused, then RSET
        assert transaction_commands(up)[-2:] == ["DATA", "RSET"]
        assert not any("<message" in ln for ln in result.transcript)
        assert (await pool.deliver("Q2", MSG, "a@example.com", ["c@example.net"])).delivered
        assert up.connections == 1
        await pool.aclose()


async def test_354_without_an_accepted_recipient_gets_a_lone_dot_never_the_body() -> None:
    # RFC 2920 §3.1: if DATA was accepted anyway, the client should send a single dot.
    replies = {"rcpt": {"a@example.net": "550 5.1.1 unknown"}, "data": ["354 go ahead"],
               "dot": ["554 5.5.1 no valid recipients"]}
    async with FakeUpstream(pipelining=True, replies=replies) as up:
        pool = SmarthostPool(up.smarthost(), hostname="relay.test", transcripts=True)
        result = await pool.deliver("Q1", MSG, "a@example.com", ["a@example.net"])
        assert result.failed == ("a@example.net",) and result.outcomes[0].reply.code == 550
        assert up.forced_data == [b""]  # the dot alone
        assert "C: ." in result.transcript and not any("<message" in ln for ln in result.transcript)
        assert transaction_commands(up)[-1] == "RSET"
        assert (await pool.deliver("Q2", MSG, "a@example.com", ["c@example.net"])).delivered
        assert up.messages[0].data == MSG and up.connections == 1
        await pool.aclose()


async def test_mail_refused_but_data_answered_354_gets_a_lone_dot() -> None:
    replies = {"mail": ["550 5.7.1 no"], "data": ["354 go ahead"], "dot": ["503 5.5.1 no"]}
    async with FakeUpstream(pipelining=True, replies=replies) as up:
        result = await deliver(up.smarthost(), ("a@example.net", "b@example.net"))
        assert result.failed == ("a@example.net", "b@example.net")
        assert all(o.reply.code == 550 for o in result.outcomes)
        assert up.forced_data == [b""] and up.messages == []


async def test_data_refused_settles_the_accepted_recipients() -> None:
    replies = {"data": ["451 4.3.0 try later"], "rcpt": {"gone@example.net": "550 5.1.1 unknown"}}
    async with FakeUpstream(pipelining=True, replies=replies) as up:
        pool = SmarthostPool(up.smarthost(), hostname="relay.test")
        result = await pool.deliver("Q1", MSG, "a@example.com", ("a@example.net", "gone@example.net"))
        assert [o.status for o in result.outcomes] == [Status.DEFERRED, Status.FAILED]
        assert str(result.outcomes[0].reply) == "451 4.3.0 try later"
        assert up.messages == [] and transaction_commands(up)[-1] == "RSET"
        assert (await pool.deliver("Q2", MSG, "a@example.com", ["a@example.net"])).delivered
        assert up.connections == 1
        await pool.aclose()


async def test_452_leftover_goes_in_a_new_transaction_on_the_same_connection() -> None:
    full = "452 4.5.3 Too many recipients"
    async with FakeUpstream(pipelining=True,
                            replies={"rcpt": {"b@example.net": [full], "c@example.net": [full]}}) as up:
        rcpts = ("a@example.net", "b@example.net", "c@example.net")
        result = await deliver(up.smarthost(), rcpts)
        assert result.delivered == rcpts
        assert [m.rcpt_tos for m in up.messages] == [["a@example.net"], ["b@example.net", "c@example.net"]]
        assert up.waiting_at_mail == [[*rcpt_lines(*rcpts), "DATA"],
                                      [*rcpt_lines("b@example.net", "c@example.net"), "DATA"]]
        assert up.connections == 1


@pytest.mark.parametrize("refusal", ["452 4.5.3 Too many recipients", "552 5.5.3 Too many recipients"])
async def test_a_too_many_recipients_reply_then_an_accepted_recipient_is_delivered_once(
        refusal: str) -> None:
    # In a group every RCPT was sent: one the server took after the refusal stays in the
    # transaction; only the refused one goes in the next (never a copy to anyone twice). A 552
    # is read as 452 (RFC 5321 §4.5.3.1.10).
    async with FakeUpstream(pipelining=True, replies={"rcpt": {"b@example.net": [refusal]}}) as up:
        rcpts = ("a@example.net", "b@example.net", "c@example.net")
        result = await deliver(up.smarthost(), rcpts)
        assert result.delivered == rcpts
        assert [m.rcpt_tos for m in up.messages] == [["a@example.net", "c@example.net"], ["b@example.net"]]
        assert up.connections == 1

async def test_421_mid_group_defers_everyone_and_closes() -> None:
    async with FakeUpstream(pipelining=True,
                            replies={"rcpt": {"b@example.net": ["421 4.7.0 closing"]}}) as up:
        pool = SmarthostPool(up.smarthost(), hostname="relay.test")
        rcpts = ("a@example.net", "b@example.net", "c@example.net")
        result = await pool.deliver("Q1", MSG, "a@example.com", rcpts)
        assert result.deferred == rcpts
        assert all(o.reply.code == 421 for o in result.outcomes)
        assert result.smarthost_fault
        assert up.messages == [] and pool.statistics().open_connections == 0
        assert (await pool.deliver("Q2", MSG, "a@example.com", rcpts)).delivered == rcpts
        assert up.connections == 2
        await pool.aclose()


async def test_malformed_reply_in_a_group_defers_and_closes() -> None:
    async with FakeUpstream(pipelining=True, replies={"rcpt": {"b@example.net": ["no code here"]}}) as up:
        pool = SmarthostPool(up.smarthost(), hostname="relay.test")
        rcpts = ("a@example.net", "b@example.net", "c@example.net")
        result = await pool.deliver("Q1", MSG, "a@example.com", rcpts)
        assert result.deferred == rcpts
        assert result.outcomes[1].reply.code == -1 and "no code here" in result.outcomes[1].reply.text
        assert up.messages == [] and pool.statistics().open_connections == 0
        assert (await pool.deliver("Q2", MSG, "a@example.com", rcpts)).delivered == rcpts
        await pool.aclose()


async def test_overlong_reply_is_malformed_not_a_bounce() -> None:
    async with FakeUpstream(pipelining=True, replies={"mail": ["250 " + "x" * 9000]}) as up:
        result = await deliver(up.smarthost(), ("a@example.net", "b@example.net"))
        assert result.deferred == ("a@example.net", "b@example.net")
        assert result.outcomes[0].reply.code == -1 and "too long" in result.outcomes[0].reply.text
        assert up.messages == []


# -- disconnects and timeouts --------------------------------------------------------------------

@pytest.mark.parametrize("stage", ["rcpt", "data", "body", "dot"])
def test_disconnect_in_a_group_defers_and_the_next_attempt_reconnects(on_loop: Runner, stage: str) -> None:
    async def scenario() -> None:
        async with FakeUpstream(pipelining=True, drop_at=stage, drop_once=True) as up:
            pool = SmarthostPool(up.smarthost(), hostname="relay.test")
            rcpts = ("a@example.net", "b@example.net")
            first = await pool.deliver("Q1", MSG, "a@example.com", rcpts)
            assert first.deferred == rcpts and first.smarthost_fault
            assert all(o.dsn.startswith("4.") for o in first.outcomes)
            assert "closed the connection" in first.error
            assert up.messages == []
            second = await pool.deliver("Q2", MSG, "a@example.com", rcpts)
            assert second.delivered == rcpts and up.connections == 2
            await pool.aclose()
    on_loop(scenario)


@pytest.mark.parametrize("stage", ["mail", "rcpt", "data"])
async def test_timeout_waiting_for_a_group_reply(stage: str) -> None:
    async with FakeUpstream(pipelining=True, hang_at=stage) as up:
        started = time.monotonic()
        result = await deliver(up.smarthost(timeout=0.3), ("a@example.net", "b@example.net"))
        assert time.monotonic() - started < 3
        assert result.deferred == ("a@example.net", "b@example.net")
        assert result.smarthost_fault and "timed out" in result.error
        assert up.messages == []


@pytest.mark.parametrize("how", ["closed while idle", "dropped at MAIL", "421 at MAIL"])
def test_reused_connection_the_server_dropped_is_retried_on_a_new_one(on_loop: Runner, how: str) -> None:
    async def scenario() -> None:
        async with FakeUpstream(pipelining=True) as up:
            pool = SmarthostPool(up.smarthost(), hostname="relay.test")
            assert (await pool.deliver("Q1", MSG, "a@example.com", ["b@example.net"])).delivered
            if how == "closed while idle":
                for proto in list(up._protocols):
                    proto.transport.close()  # and deliver at once, before the client may notice
            elif how == "dropped at MAIL":
                up.drop_at, up.drop_once = "mail", True
            else:
                up.replies["mail"] = ["421 4.4.2 idle timeout, closing"]
            result = await pool.deliver("Q2", MSG, "a@example.com", ["b@example.net", "c@example.net"])
            assert result.delivered == ("b@example.net", "c@example.net")
            assert not result.smarthost_fault and result.error == ""
            assert up.connections == 2 and len(up.messages) == 2
            await pool.aclose()
    on_loop(scenario)


# -- transcripts -----------------------------------------------------------------------------------

def _secret_forms(user: str, password: str) -> list[str]:
    b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    return [password, b64(password), b64(f"\0{user}\0{password}"), b64(user)]


async def test_transcript_shows_the_group_in_wire_order_and_redacts_auth(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with FakeUpstream(tls="starttls", pipelining=True, auth=("PLAIN", "LOGIN"), refuse_plain=True,
                            credentials={"relay": PASSWORD},
                            replies={"rcpt": {"gone@example.net": "550 5.1.1 unknown"}}) as up:
        auth = AuthConfig(method=AuthMethod.AUTO, username="relay", password=Secret(PASSWORD))
        result = await deliver(up.smarthost(auth=auth), ("b@example.net", "gone@example.net"),
                               transcripts=True)
    assert result.outcomes[0].status is Status.SENT
    lines = list(result.transcript)
    start = lines.index("C: MAIL FROM:<a@example.com>")
    assert lines[start:start + 10] == [
        "C: MAIL FROM:<a@example.com>", "C: RCPT TO:<b@example.net>", "C: RCPT TO:<gone@example.net>",
        "C: DATA", "S: 250 OK", "S: 250 OK", "S: 550 5.1.1 unknown",
        "S: 354 End data with <CR><LF>.<CR><LF>", f"C: <message, {len(MSG)} bytes>", "C: ."]
    assert lines[start + 10].startswith("S: 250 2.0.0 Ok: queued")
    assert "C: AUTH PLAIN <redacted>" in lines and "C: AUTH LOGIN" in lines
    logged = [r.getMessage() for r in caplog.records if r.name == "relayd.forwarder"]
    assert [m.split(" ", 3)[3] for m in logged] == lines  # the log has the same lines, in order
    text = "\n".join(lines) + "\n".join(r.getMessage() for r in caplog.records)
    for secret in _secret_forms("relay", PASSWORD):
        assert secret not in text
