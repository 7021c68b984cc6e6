"""What the operator sees after each kind of delivery failure, and what `queue retry` does once
the fault is cleared (SPEC "attempts", "queue retry").

Black box: `relayd run` as a process with a real config file, a scripted smarthost, and only
the `relayd` commands and the log to look at. The retry interval is an hour, so anything
delivered within the test was delivered because the operator asked.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.oauth_server import FakeTokenServer, TokenServers
from tests.support.operator import Operator
from tests.support.relay import free_port, upstream_smarthost, wait_until
from tests.support.tls_versions import LEGACY, MODERN, legacy_tls_unavailable
from tests.support.upstream import FakeUpstream, Upstreams

RCPT = "user@example.net"
HOUR = {"retry": {"initial": "1h", "max_interval": "2h"}}
SECRET = "s3cret-client"


class IssuedTokens(set[str]):
    """The upstream accepts exactly the tokens the fake token endpoint issued."""

    def __init__(self, server: FakeTokenServer) -> None:
        super().__init__()
        self.server = server

    def __contains__(self, token: object) -> bool:
        return token in self.server.issued


@dataclass(frozen=True)
class Case:
    id: str
    error: str                                   # what last_error names (regex, any case)
    clear: Callable[[FakeUpstream, FakeTokenServer], None]
    upstream: dict[str, Any] = field(default_factory=dict)
    smarthost: dict[str, Any] = field(default_factory=dict)
    failed: bool = False                         # a 5xx: the message is failed, not waiting
    listening: bool = True                       # False: nothing listens until cleared
    oauth: bool = False
    logged: str | None = None                    # what the delivery log line says (regex)
    # The server stalls: the attempt gives up after the smarthost's timeout (1s), not later.
    stalls: bool = False
    # A TLS failure: before it is cleared nothing but EHLO and STARTTLS went over the wire.
    tls_fault: bool = False
    # The operator clears the fault by changing these smarthost settings (file + SIGHUP).
    reconfigure: dict[str, Any] = field(default_factory=dict)
    skip: str | None = None                      # why this machine cannot run the case


def _pop(stage: str) -> Callable[[FakeUpstream, FakeTokenServer], None]:
    return lambda up, _: up.replies.pop(stage, None)


def _set(**attrs: Any) -> Callable[[FakeUpstream, FakeTokenServer], None]:
    def clear(up: FakeUpstream, _: FakeTokenServer) -> None:
        for key, value in attrs.items():
            setattr(up, key, value)
    return clear


def _allow_client(_: FakeUpstream, server: FakeTokenServer) -> None:
    server.clients["app1"] = SECRET


STALL = {"timeout": "1s"}
STARTTLS = {"tls": "starttls"}


CASES = [
    Case("connection-refused", r"cannot connect to .*connection refused", lambda up, _: None,
         listening=False),
    # T61: a smarthost name that does not resolve; the operator corrects it in the file.
    Case("host-does-not-resolve", r"cannot connect to nonexistent\.invalid:\d+: cannot resolve the host name",
         lambda up, _: None, smarthost={"host": "nonexistent.invalid"}, reconfigure={"host": "127.0.0.1"},
         logged=r"status=deferred \(451 4\.4\.3 cannot resolve the host name"),
    # T61: stalls at each step of setting up the session, cut off by the smarthost timeout:
    # a server that accepts the connection but never greets, one that answers STARTTLS but
    # never takes part in the handshake, one that never answers AUTH.
    Case("timeout-no-answer", r"timed out while receiving the initial server greeting",
         _set(hang_at=None), upstream={"hang_at": "greeting"}, smarthost=STALL, stalls=True,
         logged=r"status=deferred \(451 4\.4\.2 timed out while receiving the initial server greeting"),
    Case("stall-after-starttls", r"timed out while performing the TLS handshake", _set(hang_at=None),
         upstream={"tls": "starttls", "hang_at": "starttls"}, smarthost={**STALL, **STARTTLS},
         stalls=True, tls_fault=True,
         logged=r"status=deferred \(451 4\.4\.2 timed out while performing the TLS handshake"),
    Case("stall-after-auth", r"timed out after AUTH", _set(hang_at=None),
         upstream={"tls": "starttls", "hang_at": "auth", "auth": ("PLAIN", "LOGIN"),
                   "credentials": {"relay": "right"}, "require_auth": True},
         smarthost={**STALL, **STARTTLS, "auth": {"method": "auto", "username": "relay", "password": "right"}},
         stalls=True, logged=r"status=deferred \(451 4\.4\.2 timed out after AUTH"),
    # T65: certificates that do not verify, and a server without TLS 1.2: never clear text.
    Case("tls-name-mismatch", r"certificate verify failed.*hostname mismatch|certificate",
         lambda up, _: up.reissue("localhost"),
         upstream={"tls": "starttls", "hostname": "wrong.example"},
         smarthost={"host": "localhost", "tls": "starttls"}, tls_fault=True,
         logged=r"status=deferred \(451 4\.7\.5 TLS certificate verification failed"),
    Case("tls-certificate-expired", r"certificate verify failed.*certificate has expired",
         lambda up, _: up.reissue("localhost"), upstream={"tls": "starttls", "expired": True},
         smarthost={"host": "localhost", **STARTTLS}, tls_fault=True,
         logged=r"status=deferred \(451 4\.7\.5 TLS certificate verification failed"),
    # relayd asks for TLS 1.2 or later. A server that only has 1.0 and 1.1 answers with an
    # alert ("TLS handshake with ... failed: TLSV1_ALERT_PROTOCOL_VERSION") or, as asyncio's
    # (the fake's) does, by closing the connection.
    Case("tls-1.1-only", r"closed the connection while performing the TLS handshake|TLS handshake with .* failed",
         lambda up, _: up.serve_tls_versions(MODERN),
         upstream={"tls": "starttls", "tls_versions": LEGACY}, smarthost=STARTTLS, tls_fault=True,
         logged=r"status=deferred \(451 4\.(4\.2 connection lost while performing the|7\.5) TLS handshake",
         skip=legacy_tls_unavailable()),
    Case("starttls-not-offered", r"STARTTLS", _set(tls="starttls"), smarthost={"tls": "starttls"},
         tls_fault=True),
    Case("auth-535", r"535", lambda up, _: up.credentials.update(relay="typo"),
         upstream={"auth": ("PLAIN", "LOGIN"), "credentials": {"relay": "right"}, "require_auth": True},
         smarthost={"auth": {"method": "auto", "username": "relay", "password": "typo"}}),
    Case("token-endpoint-refuses", r"token", _allow_client, oauth=True),
    Case("421-at-greeting", r"421", _pop("greeting"),
         upstream={"replies": {"greeting": "421 4.3.2 Service not available"}}),
    Case("451-at-mail", r"451 4\.3\.0", _pop("mail"),
         upstream={"replies": {"mail": "451 4.3.0 Mail server temporarily rejected message"}}),
    Case("550-at-mail", r"550 5\.7\.1", _pop("mail"), failed=True,
         upstream={"replies": {"mail": "550 5.7.1 Sender address rejected"}}),
    Case("450-at-rcpt", r"450 4\.2\.1", _pop("rcpt"),
         upstream={"replies": {"rcpt": {RCPT: "450 4.2.1 Mailbox busy"}}}),
    Case("550-at-rcpt", r"550 5\.1\.1", _pop("rcpt"), failed=True,
         upstream={"replies": {"rcpt": {RCPT: "550 5.1.1 User unknown"}}}),
    Case("451-at-data", r"451 4\.3\.0", _pop("data"),
         upstream={"replies": {"data": "451 4.3.0 Not now"}}),
    Case("554-at-data", r"554 5\.7\.1", _pop("data"), failed=True,
         upstream={"replies": {"data": "554 5.7.1 Not from you"}}),
    Case("451-after-dot", r"451 4\.3\.0 Try again later", _pop("dot"),
         upstream={"replies": {"dot": "451 4.3.0 Try again later"}}),
    Case("554-after-dot", r"554 5\.6\.0", _pop("dot"), failed=True,
         upstream={"replies": {"dot": "554 5.6.0 Message content rejected"}}),
    Case("connection-cut", r"closed the connection|connection lost", _set(drop_at=None),
         upstream={"drop_at": "body"}),
]


def _smarthost(up: FakeUpstream, case: Case, tokens: FakeTokenServer) -> dict[str, Any]:
    entry = upstream_smarthost(up, **case.smarthost)
    if case.oauth:
        entry["auth"] = {"method": "xoauth2", "username": "relay@example.com", "oauth": {
            "provider": "generic", "token_url": tokens.token_url, "client_id": "app1",
            "client_secret": SECRET, "scope": "smtp.send", "grant": "client_credentials"}}
    return entry


def _param(case: Case) -> Any:
    marks = [pytest.mark.skip(reason=case.skip)] if case.skip else []
    return pytest.param(case, id=case.id, marks=marks)


def _setup_seconds(line: str) -> float:
    """The third of Postfix's ``delays=a/b/c/d``: connecting, TLS, EHLO and AUTH."""
    match = re.search(r"delays=[\d.]+/[\d.]+/([\d.]+)/", line)
    assert match, line
    return float(match.group(1))


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
async def test_a_failed_attempt_counts_says_why_and_queue_retry_delivers_once_cleared(
        tmp_path: Path, case: Case, token_server: TokenServers, upstream: Upstreams) -> None:
    tokens = token_server(clients={"app1": "not-the-configured-secret"})
    up = await upstream(listening=False, port=free_port(), **case.upstream)
    if case.oauth:
        up.auth, up.require_auth, up.tokens = ("XOAUTH2",), True, IssuedTokens(tokens)
    if case.listening:
        await up.start()
    op = Operator(tmp_path, [_smarthost(up, case, tokens)], spool=HOUR)
    await op.start()
    try:
        qid = await op.send()
        state = "failed" if case.failed else "queued"
        # relayd writes the attempt's metadata first and then moves the file from active/
        # (listed as queued) to failed/: wait for the move too, not just for the count.
        row = await op.wait_entry(qid, f"the attempt in queue list, {state}",
                                  lambda r: r["attempts"] >= 1 and r["state"] == state)
        # One attempt was made, it says what failed, and nothing retries on its own for an hour.
        assert row["attempts"] == 1, row
        assert re.search(case.error, row["last_error"] or "", re.IGNORECASE), row
        assert row["state"] == state, row
        status = "failed" if case.failed else "deferred"

        show = await op.cli("queue", "show", qid)
        assert show.code == 0
        history = show.out.split("history:")[1].split("headers:")[0]
        assert re.search(rf"{status}\s+{RCPT} relay=primary\[", history), show.out
        assert "attempts:     1" in show.out

        lines = op.delivery_lines(qid)
        assert len(lines) == 1, op.log()
        assert "attempts=1," in lines[0] and f"status={status}" in lines[0], lines[0]
        if case.logged is not None:
            assert re.search(case.logged, lines[0]), lines[0]
        if case.stalls:  # cut off by the 1 s timeout of that step, not by anything longer
            assert 0.9 <= _setup_seconds(lines[0]) < 2.0, lines[0]
        if case.tls_fault:  # not a word in clear text beyond EHLO and STARTTLS
            assert {c.split()[0] for c in up.commands} <= {"EHLO", "STARTTLS", "QUIT"}, up.commands
            assert up.auth_attempts == [] and up.messages == []

        case.clear(up, tokens)
        if case.reconfigure:
            await op.reload(lambda data: data["smarthosts"][0].update(case.reconfigure))
        if not case.listening:
            await up.start()
        retry = await op.cli("queue", "retry", qid)
        assert retry.code == 0 and f"{qid}: scheduled for delivery now" in retry.out
        await wait_until(lambda: len(up.messages) == 1, timeout=15, what="delivery after queue retry")

        async def gone() -> bool:
            return await op.entry(qid) is None
        await wait_until(gone, 10, "the delivered message to leave the queue")
        final = op.delivery_lines(qid)[-1]
        assert "status=sent" in final and "attempts=2," in final, final
        assert up.messages[0].rcpt_tos == [RCPT]
    finally:
        await op.stop()
