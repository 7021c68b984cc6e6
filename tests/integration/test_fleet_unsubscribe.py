"""An unsubscribe through one node's one-click endpoint, enforced by another node: two
`relayd run` processes sharing one PostgreSQL database, seen as the operator and the
recipient see them (the endpoint's HTTP status, SMTP replies, the log, `queue list --json`
and what the smarthost received)."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from relayd.config.load import load_config
from relayd.policy.unsubscribe import recipient_url
from tests.integration.test_fleet import refuses_at_rcpt
from tests.support.operator import Operator
from tests.support.postgres import PASSWORD, Cluster
from tests.support.relay import free_port, listening, upstream_smarthost
from tests.support.upstream import FakeUpstream, Upstreams
from tests.support.waiting import wait_until

SECRET = "fleet-unsubscribe-secret"


def _fleet(tmp_path: Path, pg: Cluster, up: FakeUpstream, **extra: Any) -> tuple[Operator, Operator, int]:
    """relay-a serves the one-click endpoint; both nodes sign links with the same secret."""
    http_port = free_port()
    url = f"http://127.0.0.1:{http_port}/unsubscribe?token={{token}}"
    nodes = []
    for name, unsub in (("relay-a", {"url": url, "secret": SECRET, "http_listen": f"127.0.0.1:{http_port}"}),
                        ("relay-b", {"url": url, "secret": SECRET})):
        home = tmp_path / name
        home.mkdir()
        (home / "pg.password").write_text(PASSWORD + "\n")
        shared = {"url": pg.url, "password_file": str(home / "pg.password"), "node": name}
        nodes.append(Operator(home, [upstream_smarthost(up)], shared_state=shared,
                              unsubscribe=unsub, **extra))
    return nodes[0], nodes[1], http_port


def _one_click(node: Operator, address: str) -> int:
    """POST the one-click form to the link relayd puts in mail to ``address``."""
    unsub = load_config(node.config).unsubscribe
    assert unsub is not None
    url = recipient_url(unsub, SECRET.encode(), address)
    assert url is not None
    req = urllib.request.Request(url, data=b"List-Unsubscribe=One-Click", method="POST",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _message(n: int, to: str) -> bytes:
    return (f"From: app@example.com\r\nTo: {to}\r\nSubject: news {n}\r\n"
            f"Message-ID: <news-{n}@example.com>\r\n\r\nbody {n}\r\n").encode()


async def _start(a: Operator, b: Operator, http_port: int) -> None:
    assert (await a.cli("shared-state", "migrate")).code == 0
    await asyncio.gather(a.start(), b.start())
    await wait_until(lambda: listening(http_port), 10, "relay-a's one-click endpoint")


async def test_an_unsubscribe_on_node_a_stops_delivery_of_mail_queued_on_node_b(
        tmp_path: Path, pg: Cluster, upstream: Upstreams) -> None:
    up = await upstream(replies={"mail": "451 4.3.0 try later"})
    a, b, http_port = _fleet(tmp_path, pg, up)
    await _start(a, b, http_port)
    try:
        qid = await b.send(_message(1, "carol@example.net"), rcpts=("carol@example.net",))
        await b.wait_entry(qid, "a deferred attempt on relay-b", lambda r: r["attempts"] >= 1)
        status = await asyncio.to_thread(_one_click, a, "Carol@Example.net")
        acknowledged = time.monotonic()
        assert 200 <= status < 300
        # relay-b keeps retrying (every second at most: spool.retry.max_interval in the
        # tests' config); within a second of the 2xx it knows, so its next attempt at the
        # latest drops carol instead of offering her to the smarthost.
        await wait_until(lambda: any("status=suppressed" in line for line in b.delivery_lines(qid)),
                         10, "relay-b to drop carol at delivery")
        assert time.monotonic() - acknowledged < 2.5

        # Nothing left to deliver: relayd logs the suppressed line, then lets the spool file
        # go (in its removal thread), so wait for that.
        async def gone() -> bool:
            return await b.entry(qid) is None
        await wait_until(gone, 10, "carol's message to leave relay-b's queue", interval=0.1)
        # The smarthost accepts again: a message to someone else goes, carol's never did.
        up.replies = {}
        await b.send(_message(2, "dave@example.net"), rcpts=("dave@example.net",))
        await wait_until(lambda: len(up.messages) == 1, 20, "dave's delivery")
        assert [m.rcpt_tos for m in up.messages] == [["dave@example.net"]]
        assert all(m.mail_from == "app@example.com" for m in up.messages)
        assert not any("carol@example.net" in line and "status=sent" in line
                       for line in b.log().splitlines())
        listed = await b.cli("suppress", "list")
        assert listed.code == 0 and "carol@example.net" in listed.out
        assert SECRET not in a.log() + b.log()
    finally:
        assert await asyncio.gather(a.stop(), b.stop()) == [0, 0]


async def test_with_action_reject_node_b_refuses_the_address_at_rcpt_within_a_second(
        tmp_path: Path, pg: Cluster, upstream: Upstreams) -> None:
    up = await upstream()
    a, b, http_port = _fleet(tmp_path, pg, up, do_not_email={"action": "reject"})
    await _start(a, b, http_port)
    try:
        await b.send(_message(1, "erin@example.net"), rcpts=("erin@example.net",))
        await wait_until(lambda: len(up.messages) == 1, 20, "the first delivery")
        status = await asyncio.to_thread(_one_click, a, "erin@example.net")
        acknowledged = time.monotonic()
        assert 200 <= status < 300
        await wait_until(lambda: refuses_at_rcpt(b, 2, "erin@example.net"), 1.0,
                         "relay-b to refuse erin at RCPT", interval=0.05)
        assert time.monotonic() - acknowledged < 1.0
        # (Probes relay-b accepted before it knew, within that second, may still go: the
        # SPEC's "within 1 s" is the bound, not "at once".)
    finally:
        assert await asyncio.gather(a.stop(), b.stop()) == [0, 0]
