"""The one-click unsubscribe endpoint over a real socket on 127.0.0.1 (port 0)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import pytest

from relayd.config import UnsubscribeConfig
from relayd.policy.unsubscribe import make_token, recipient_url
from relayd.secrets import Secret
from relayd.suppressions import SuppressionStore
from relayd.units import HostPort
from relayd.unsub_http import UnsubscribeServer, serve_unsubscribe

SECRET = "endpoint-secret"


def _cfg(url: str = "https://example.com/unsubscribe?token={token}") -> UnsubscribeConfig:
    return UnsubscribeConfig(url=url, secret=Secret(SECRET), http_listen=HostPort("127.0.0.1", 0))


async def http(port: int, method: str, target: str, body: bytes = b"") -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n\r\n")
    writer.write(head.encode() + body)
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1].decode()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[UnsubscribeServer, SuppressionStore]]:
    store = SuppressionStore(tmp_path)
    srv = UnsubscribeServer(_cfg(), store)
    await srv.start()
    yield srv, store
    await srv.aclose()
    store.close()


def _target(address: str) -> str:
    url = recipient_url(_cfg(), SECRET.encode(), address)
    assert url is not None
    return url.removeprefix("https://example.com")


async def test_one_click_post_with_valid_token_adds_the_address(server) -> None:  # type: ignore[no-untyped-def]
    srv, store = server
    status, body = await http(srv.port, "POST", _target("Alice@Example.net"), b"List-Unsubscribe=One-Click")
    assert status == 200 and "alice@example.net" in body
    assert store.contains("alice@example.net")


async def test_forged_token_is_refused(server) -> None:  # type: ignore[no-untyped-def]
    srv, store = server
    forged = "/unsubscribe?token=" + quote(make_token(b"guessed", "mallory@example.net"))
    status, _ = await http(srv.port, "POST", forged, b"List-Unsubscribe=One-Click")
    assert status == 403
    status, _ = await http(srv.port, "POST", "/unsubscribe?token=garbage", b"List-Unsubscribe=One-Click")
    assert status == 403
    assert store.list() == []


async def test_get_shows_a_form_and_does_not_unsubscribe(server) -> None:  # type: ignore[no-untyped-def]
    srv, store = server
    target = _target("bob@example.net")
    status, body = await http(srv.port, "GET", target)
    assert status == 200
    assert '<form method="post"' in body and 'name="List-Unsubscribe" value="One-Click"' in body
    assert "bob@example.net" in body
    assert store.list() == []                    # a link scanner's GET changes nothing


async def test_wrong_body_path_and_method(server) -> None:  # type: ignore[no-untyped-def]
    srv, store = server
    target = _target("carol@example.net")
    assert (await http(srv.port, "POST", target, b"something=else"))[0] == 400
    assert (await http(srv.port, "GET", "/other"))[0] == 404
    assert (await http(srv.port, "DELETE", target))[0] == 405
    assert store.list() == []


async def test_token_in_path_and_email_must_agree(tmp_path: Path) -> None:
    cfg = _cfg("https://example.com/u/{token}?e={email}")
    store = SuppressionStore(tmp_path)
    ready = asyncio.Event()
    srv = UnsubscribeServer(cfg, store)
    await srv.start()
    try:
        good = f"/u/{make_token(SECRET.encode(), 'dave@example.net')}?e=dave@example.net"
        mismatch = f"/u/{make_token(SECRET.encode(), 'dave@example.net')}?e=erin@example.net"
        assert (await http(srv.port, "POST", mismatch, b"List-Unsubscribe=One-Click"))[0] == 403
        assert (await http(srv.port, "POST", good, b"List-Unsubscribe=One-Click"))[0] == 200
        assert store.list() == ["dave@example.net"]
    finally:
        await srv.aclose()
        store.close()
    # the task form used by the daemon signals readiness through an event
    store = SuppressionStore(tmp_path)
    task = asyncio.create_task(serve_unsubscribe(cfg, store, ready=ready))
    await asyncio.wait_for(ready.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    store.close()
