"""The one-click unsubscribe endpoint over a real socket on 127.0.0.1 (port 0), and through
``relayd run`` as a separate process with ``relayd suppress list`` reading what it recorded."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml

from relayd.config.load import load_config
from relayd.config.schema import UnsubscribeConfig
from relayd.control.unsubscribe_http import UnsubscribeServer, serve_unsubscribe
from relayd.policy.suppressions import DB_NAME, SuppressionStore
from relayd.policy.unsubscribe import make_token, recipient_url
from relayd.secrets import Secret
from relayd.units import HostPort
from tests.support.relay import ROOT, RelayProcess, free_port, listening, wait_until, write_config

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


async def test_recording_failure_answers_503_never_2xx(tmp_path: Path) -> None:
    """A 2xx promises the address is listed: when the list cannot be written (here SQLite
    cannot create its -wal file, as on a read-only or broken state_dir), the answer is 5xx."""
    store = SuppressionStore(tmp_path)
    wal = tmp_path / f"{DB_NAME}-wal"
    wal.mkdir()
    srv = UnsubscribeServer(_cfg(), store)
    await srv.start()
    try:
        status, body = await http(srv.port, "POST", _target("frank@example.net"),
                                  b"List-Unsubscribe=One-Click")
        assert status == 503 and "frank@example.net" not in body
        wal.rmdir()                              # repaired: the sender's retry is recorded
        status, _ = await http(srv.port, "POST", _target("frank@example.net"),
                               b"List-Unsubscribe=One-Click")
        assert status == 200
        assert store.list() == ["frank@example.net"]
    finally:
        await srv.aclose()
        store.close()


# -- relayd run as a process, as deployed -------------------------------------------------------

ONE_CLICK = b"List-Unsubscribe=One-Click"


def _smallest_endpoint_config(tmp_path: Path) -> tuple[Path, int, int]:
    """``unsubscribe: {url, secret, http_listen}`` and nothing about do_not_email."""
    smtp_port, http_port = free_port(), free_port()
    cfg = write_config(tmp_path, [{"name": "preview", "outbox": str(tmp_path / "outbox")}],
                       port=smtp_port,
                       unsubscribe={"url": f"http://127.0.0.1:{http_port}/unsubscribe?token={{token}}",
                                    "secret": SECRET, "http_listen": f"127.0.0.1:{http_port}"})
    assert "do_not_email" not in yaml.safe_load(cfg.read_text())
    return cfg, smtp_port, http_port


def _post(url: str, body: bytes = ONE_CLICK) -> int:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _suppress_list(cfg: Path) -> list[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "relayd", "-c", str(cfg), "suppress", "list",
                          "--json"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    listed: list[str] = json.loads(run.stdout)
    return listed


async def _listed_within_a_second(cfg: Path, address: str) -> list[str]:
    """Poll ``relayd suppress list --json`` until ``address`` shows; every call that starts
    within a second of the acknowledgement counts."""
    listed: list[str] = []

    async def shows() -> list[str] | None:
        listed[:] = await asyncio.to_thread(_suppress_list, cfg)
        return list(listed) if address in listed else None
    return await wait_until(shows, 1.0, lambda: f"{address} in the list a second after the 2xx: {listed}",
                            interval=0)


async def _start(tmp_path: Path, cfg: Path, smtp_port: int, http_port: int) -> RelayProcess:
    proc = RelayProcess(cfg, smtp_port, tmp_path / "relayd.log")
    await asyncio.to_thread(proc.start)
    # The endpoint binds right after the SMTP listener: wait for it too, with a deadline.
    await wait_until(lambda: listening(http_port), what="the one-click endpoint")
    return proc


async def test_acknowledged_one_click_is_on_the_list_without_auto_add(tmp_path: Path) -> None:
    cfg, smtp_port, http_port = _smallest_endpoint_config(tmp_path)
    unsub = load_config(cfg).unsubscribe
    assert unsub is not None
    url = recipient_url(unsub, SECRET.encode(), "Alice@Example.net")   # as relayd writes it
    assert url is not None
    forged = (f"http://127.0.0.1:{http_port}/unsubscribe?token="
              + quote(make_token(b"guessed-secret", "mallory@example.net"), safe=""))
    proc = await _start(tmp_path, cfg, smtp_port, http_port)
    try:
        status = await asyncio.to_thread(_post, url)
        assert 200 <= status < 300
        assert await _listed_within_a_second(cfg, "alice@example.net") == ["alice@example.net"]
        assert 400 <= await asyncio.to_thread(_post, forged) < 500
        assert await asyncio.to_thread(_suppress_list, cfg) == ["alice@example.net"]
    finally:
        assert proc.stop() == 0
    log = proc.log()
    assert SECRET not in log and "mallory" not in log


async def test_endpoint_answers_5xx_when_the_list_cannot_be_written(tmp_path: Path) -> None:
    cfg, smtp_port, http_port = _smallest_endpoint_config(tmp_path)
    unsub = load_config(cfg).unsubscribe
    assert unsub is not None
    url = recipient_url(unsub, SECRET.encode(), "grace@example.net")
    assert url is not None
    proc = await _start(tmp_path, cfg, smtp_port, http_port)
    wal = tmp_path / "state" / f"{DB_NAME}-wal"
    try:
        wal.mkdir()                 # SQLite cannot write its log: the list is unwritable
        status = await asyncio.to_thread(_post, url)
        assert 500 <= status < 600, status
        wal.rmdir()
        assert await asyncio.to_thread(_suppress_list, cfg) == []
        status = await asyncio.to_thread(_post, url)        # the sender tries again
        assert 200 <= status < 300
        assert await _listed_within_a_second(cfg, "grace@example.net") == ["grace@example.net"]
    finally:
        assert proc.stop() == 0
    assert "cannot record a one-click request" in proc.log()
    assert "grace@example.net" not in proc.log()
