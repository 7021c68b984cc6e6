"""The fleet's OAuth token cache, seen from outside: two `relayd run` nodes sharing one
PostgreSQL database deliver through an XOAUTH2 smarthost with one token request between them,
the database holds the token only encrypted, and a node that cannot reach the database gets
its own token so that mail never waits for the database."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from tests.support.oauth_server import FakeTokenServer, TokenServers
from tests.support.operator import Operator
from tests.support.postgres import PASSWORD, Cluster
from tests.support.relay import upstream_smarthost
from tests.support.upstream import FakeUpstream, Upstreams
from tests.support.waiting import wait_until

SECRET = "fleet-client-secret-9q"


def _oauth_smarthost(up: FakeUpstream, ts: FakeTokenServer) -> dict[str, Any]:
    return upstream_smarthost(up, tls="none", auth={
        "method": "xoauth2", "username": "relay@example.com",
        "oauth": {"provider": "generic", "token_url": ts.token_url, "client_id": "relayd",
                  "client_secret": SECRET, "grant": "client_credentials", "scope": "smtp"}})


def _node(tmp_path: Path, name: str, pg: Cluster, up: FakeUpstream, ts: FakeTokenServer,
          key_file: Path) -> Operator:
    home = tmp_path / name
    home.mkdir()
    (home / "pg.password").write_text(PASSWORD + "\n")
    shared = {"url": pg.url, "password_file": str(home / "pg.password"), "node": name}
    # docs/fleet.md: every node has the same secrets.key_file
    return Operator(home, [_oauth_smarthost(up, ts)], shared_state=shared,
                    secrets={"key_file": str(key_file)})


def _message(n: int) -> bytes:
    return (f"From: app@example.com\r\nTo: user{n}@example.net\r\nSubject: oauth {n}\r\n"
            f"Message-ID: <oauth-{n}@example.com>\r\n\r\nbody {n}\r\n").encode()


def _key(tmp_path: Path) -> Path:
    key_file = tmp_path / "fleet.key"
    key_file.write_bytes(Fernet.generate_key() + b"\n")
    key_file.chmod(0o600)
    return key_file


async def test_one_token_request_serves_both_nodes_and_the_database_holds_it_encrypted(
        tmp_path: Path, pg: Cluster, upstream: Upstreams, token_server: TokenServers) -> None:
    ts = token_server(clients={"relayd": SECRET})
    ts.gate = threading.Event()   # the endpoint answers only when the test says so
    up = await upstream(auth=("XOAUTH2",), require_auth=True)
    up.tokens = ts.issued  # type: ignore[assignment]  # live: every token the server issued
    key_file = _key(tmp_path)
    a = _node(tmp_path, "relay-a", pg, up, ts, key_file)
    b = _node(tmp_path, "relay-b", pg, up, ts, key_file)
    assert (await a.cli("shared-state", "migrate")).code == 0
    await asyncio.gather(a.start(), b.start())
    try:
        await asyncio.gather(a.send(_message(1), rcpts=("user1@example.net",)),
                             b.send(_message(2), rcpts=("user2@example.net",)))
        # One node asks the endpoint (held there by the gate); the other waits for it in the
        # database instead of asking too.
        await wait_until(lambda: len(ts.requests) == 1, 20, "the first token request")
        await wait_until(lambda: pg.psql("SELECT count(*) FROM pg_locks WHERE locktype = "
                                         "'advisory' AND NOT granted") == "1",
                         20, "the other node to wait for that refresh", interval=0.05)
        ts.gate.set()
        await wait_until(lambda: len(up.messages) == 2, 20, "both nodes' deliveries")
        assert ts.counts["client_credentials"] == 1
        assert ts.token_requests == 1
        assert all(m.auth_mechanism == "XOAUTH2" for m in up.messages)
        assert "that another node of the fleet fetched" in a.log() + b.log()
        # A third message through either node needs no new token either.
        await b.send(_message(3), rcpts=("user3@example.net",))
        await a.send(_message(4), rcpts=("user4@example.net",))
        await wait_until(lambda: len(up.messages) == 4, 20, "two more deliveries")
        assert ts.token_requests == 1
        stored = pg.psql("SELECT encode(blob, 'escape') FROM relayd_oauth")
        assert stored and ts.issued[0] not in stored
        logs = a.log() + b.log()
        for secret in (*ts.issued, SECRET, PASSWORD):
            assert secret not in logs
    finally:
        ts.gate.set()
        assert await asyncio.gather(a.stop(), b.stop()) == [0, 0]


async def test_a_node_that_cannot_reach_the_database_fetches_its_own_token_and_delivers(
        tmp_path: Path, pg: Cluster, upstream: Upstreams, token_server: TokenServers) -> None:
    ts = token_server(clients={"relayd": SECRET})
    up = await upstream(auth=("XOAUTH2",), require_auth=True)
    up.tokens = ts.issued  # type: ignore[assignment]
    a = _node(tmp_path, "relay-a", pg, up, ts, _key(tmp_path))
    assert (await a.cli("shared-state", "migrate")).code == 0
    await a.start()
    try:
        await asyncio.to_thread(pg.stop)
        await a.send(_message(1), rcpts=("user1@example.net",))
        await wait_until(lambda: len(up.messages) == 1, 30, "the delivery without the database")
        assert ts.token_requests == 1
        assert "the fleet's token cache is not available" in a.log()
    finally:
        if pg.pid() is None:
            await asyncio.to_thread(pg.start)
        assert await a.stop() == 0
