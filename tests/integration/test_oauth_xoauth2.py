"""A token from the token source goes through AUTH XOAUTH2 (aiosmtplib) to an upstream."""

from __future__ import annotations

from pathlib import Path

import aiosmtplib
import pytest

from relayd.oauth.source import OAuthTokenSource, build_token_source
from tests.support.clock import FakeClock
from tests.support.oauth_helpers import encrypt_with, smarthost, write_key, write_oauth_config
from tests.support.oauth_server import FakeTokenServer, TokenServers
from tests.support.xoauth2_upstream import XOAuth2Handler, start_upstream

SECRET = "xoauth2-client-secret"


@pytest.fixture
def server(token_server: TokenServers) -> FakeTokenServer:
    return token_server(clients={"app1": SECRET})


def make_source(tmp_path: Path, server: FakeTokenServer) -> OAuthTokenSource:
    key_file = write_key(tmp_path)
    cfg = write_oauth_config(tmp_path, f"""
        provider: generic
        token_url: {server.token_url}
        client_id: app1
        client_secret: "{encrypt_with(key_file, SECRET)}"
    """)
    return build_token_source(smarthost(cfg), state_dir=tmp_path / "state", key_file=key_file, clock=FakeClock())


async def send_with_xoauth2(port: int, source: OAuthTokenSource) -> aiosmtplib.SMTPResponse:
    """What the forwarder does: AUTH with the current token; on rejection invalidate, retry once."""
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=5) as smtp:
        token = await source.get_token()
        try:
            return await smtp.auth_xoauth2("relay@example.com", token)
        except aiosmtplib.SMTPAuthenticationError:
            source.invalidate(token)
            return await smtp.auth_xoauth2("relay@example.com", await source.get_token())


async def test_xoauth2_sasl_string_reaches_the_upstream(tmp_path: Path, server: FakeTokenServer) -> None:
    source = make_source(tmp_path, server)
    handler = XOAuth2Handler("relay@example.com")
    handler.valid.add(await source.get_token())
    upstream, port = await start_upstream(handler)
    try:
        for _ in range(3):   # three deliveries, one token
            reply = await send_with_xoauth2(port, source)
            assert reply.code == 235
    finally:
        upstream.close()
        await upstream.wait_closed()
    token = next(iter(handler.valid))
    assert handler.seen == [f"user=relay@example.com\x01auth=Bearer {token}\x01\x01"] * 3
    assert server.counts["client_credentials"] == 1


async def test_rejected_token_google_334_challenge_one_refresh_then_success(tmp_path: Path, server: FakeTokenServer) -> None:
    source = make_source(tmp_path, server)
    stale = await source.get_token()            # the upstream no longer accepts this one
    handler = XOAuth2Handler("relay@example.com")
    upstream, port = await start_upstream(handler)
    try:
        # Any token issued after `stale` is good.
        original_tokens = server._tokens

        def issue(*args: object, **kw: object) -> dict[str, object]:
            body = original_tokens(*args, **kw)  # type: ignore[arg-type]
            handler.valid.add(str(body["access_token"]))
            return body

        server._tokens = issue  # type: ignore[method-assign]
        reply = await send_with_xoauth2(port, source)
    finally:
        upstream.close()
        await upstream.wait_closed()
    assert reply.code == 235
    assert handler.empty_answers == 1           # the client answered the 334 JSON with an empty line
    assert len(handler.seen) == 2 and stale in handler.seen[0]
    assert server.counts["client_credentials"] == 2   # exactly one refresh
