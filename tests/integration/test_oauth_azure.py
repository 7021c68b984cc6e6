"""provider: azure through real MSAL against a local HTTPS Entra ID look-alike (trustme CA)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relayd.errors import OAuthError
from relayd.oauth.source import build_token_source
from tests.support.clock import FakeClock
from tests.support.oauth_helpers import encrypt_with, run_cli, smarthost, write_key, write_oauth_config
from tests.support.oauth_server import FakeTokenServer, TokenServers

SECRET = "azure-client-secret~abc.123"


@pytest.fixture
def server(token_server: TokenServers) -> FakeTokenServer:
    # HTTPS: MSAL (requests) verifies the fake authority with the test CA, as it would a real one.
    return token_server(https=True, clients={"azure-app": SECRET, "public-app": ""})


def app_only_config(tmp_path: Path, server: FakeTokenServer, key_file: Path) -> Path:
    return write_oauth_config(tmp_path, f"""
        provider: azure
        tenant_id: tenant1
        client_id: azure-app
        client_secret: "{encrypt_with(key_file, SECRET)}"
        authority: {server.authority('tenant1')}
    """)


async def test_app_only_client_credentials_via_msal(tmp_path: Path, server: FakeTokenServer, clock: FakeClock) -> None:
    key_file = write_key(tmp_path)
    source = build_token_source(smarthost(app_only_config(tmp_path, server, key_file)),
                                state_dir=tmp_path / "state", key_file=key_file, clock=clock)
    first = await source.get_token()
    assert first.startswith("at-")
    assert await source.get_token() == first
    req = server.requests[-1]
    assert req["scope"] == "https://outlook.office365.com/.default"
    assert req["client_id"] == "azure-app"
    assert server.counts["client_credentials"] == 1
    # Rejected by Exchange: MSAL's own cache must not hand back the same token.
    source.invalidate(first)
    second = await source.get_token()
    assert second != first
    assert server.counts["client_credentials"] == 2
    # Refresh ahead of expiry goes to Entra ID again.
    clock.advance(3600 - 599)
    assert await source.get_token() not in (first, second)
    assert server.counts["client_credentials"] == 3


async def test_app_only_wrong_secret_is_permanent(tmp_path: Path, server: FakeTokenServer) -> None:
    key_file = write_key(tmp_path)
    server.clients["azure-app"] = "rotated-by-admin"
    source = build_token_source(smarthost(app_only_config(tmp_path, server, key_file)),
                                state_dir=tmp_path / "state", key_file=key_file)
    with pytest.raises(OAuthError) as info:
        await source.get_token()
    assert info.value.permanent
    assert "AADSTS7000215" in str(info.value)
    assert SECRET not in str(info.value)


async def test_app_only_authority_down_is_temporary(tmp_path: Path, server: FakeTokenServer, clock: FakeClock) -> None:
    key_file = write_key(tmp_path)
    cfg = app_only_config(tmp_path, server, key_file)
    server.stop()
    source = build_token_source(smarthost(cfg), state_dir=tmp_path / "state", key_file=key_file, clock=clock)
    with pytest.raises(OAuthError) as info:
        await source.get_token()
    assert not info.value.permanent
    server.start()
    clock.advance(10)
    assert (await source.get_token()).startswith("at-")


def delegated_config(tmp_path: Path, server: FakeTokenServer) -> Path:
    return write_oauth_config(tmp_path, f"""
        provider: azure
        tenant_id: tenant1
        client_id: public-app
        authority: {server.authority('tenant1')}
    """, username="delegated@example.com")


async def test_delegated_device_code_then_rotating_refresh(tmp_path: Path, server: FakeTokenServer, clock: FakeClock) -> None:
    write_key(tmp_path)
    server.rotate_refresh_tokens = True
    cfg = delegated_config(tmp_path, server)
    # Before sign-in: a permanent error that says what to run.
    before = await asyncio.to_thread(run_cli, ["-c", str(cfg), "oauth", "token"])
    assert before.code == 1
    assert "relayd oauth authorize --smarthost m365" in before.out

    result = await asyncio.to_thread(run_cli, ["-c", str(cfg), "oauth", "authorize", "--smarthost", "m365"])
    assert result.code == 0, result.out + result.err
    assert "ABCD-EFGH" in result.out                     # the device code the person types
    assert "signed in as delegated@example.com" in result.out
    device_req = server.requests[0]
    assert set(device_req["scope"].split()) >= {"https://outlook.office.com/SMTP.Send", "offline_access"}
    stored = next((tmp_path / "state" / "oauth").glob("*.msal")).read_bytes()
    for tok in server.issued:
        assert tok.encode() not in stored

    source = build_token_source(smarthost(cfg), state_dir=tmp_path / "state",
                                key_file=tmp_path / "secret.key", clock=clock)
    first = await source.get_token()
    assert source.statistics().account == "delegated@example.com"
    clock.advance(3600)
    second = await source.get_token()          # uses the rotated refresh token saved by the first
    assert second != first
    assert server.counts["refresh_token"] == 2
    # The refresh token is revoked at the provider: permanent, with the fix.
    server.refresh_tokens.clear()
    clock.advance(3600)
    with pytest.raises(OAuthError) as info:
        await source.get_token()
    assert info.value.permanent
    assert "authorize" in info.value.hint


def test_authorize_refuses_app_only(tmp_path: Path, server: FakeTokenServer) -> None:
    key_file = write_key(tmp_path)
    cfg = app_only_config(tmp_path, server, key_file)
    result = run_cli(["-c", str(cfg), "oauth", "authorize"])
    assert result.code == 1
    assert "app-only" in result.out
    ok = run_cli(["-c", str(cfg), "oauth", "token"])
    assert ok.code == 0
    assert "token OK for relay@example.com (app-only)" in ok.out
    assert "expires" in ok.out
    for tok in server.issued:
        assert tok not in ok.out
