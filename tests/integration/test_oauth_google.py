"""provider: google through real google-auth against the local token endpoint."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from relayd.errors import OAuthError
from relayd.oauth.source import build_token_source
from tests.support.clock import FakeClock
from tests.support.oauth_helpers import encrypt_with, run_cli, smarthost, write_key, write_oauth_config
from tests.support.oauth_server import FakeTokenServer, TokenServers

CLIENT_SECRET = "GOCSPX-google-desktop-secret"
SA_EMAIL = "relayd@project.iam.gserviceaccount.com"


@pytest.fixture
def server(token_server: TokenServers) -> FakeTokenServer:
    return token_server(clients={"desktop.apps.googleusercontent.com": CLIENT_SECRET})


def service_account_file(tmp_path: Path, server: FakeTokenServer) -> Path:
    key = server.add_service_account(SA_EMAIL)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path = tmp_path / "sa.json"
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "project", "private_key_id": "kid1",
        "private_key": pem, "client_email": SA_EMAIL, "client_id": "1234567890",
        # The real endpoint in the file: relayd's oauth.token_url must take precedence.
        "token_uri": "https://oauth2.googleapis.com/token"}))
    return path


async def test_service_account_domain_wide_delegation(tmp_path: Path, server: FakeTokenServer, clock: FakeClock) -> None:
    key_file = write_key(tmp_path)
    cfg = write_oauth_config(tmp_path, f"""
        provider: google
        service_account_file: {service_account_file(tmp_path, server)}
        subject: mailer@example.com
        token_url: {server.token_url}
    """, username="mailer@example.com", name="gmail")
    source = build_token_source(smarthost(cfg, "gmail"), state_dir=tmp_path / "state", key_file=key_file, clock=clock)
    token = await source.get_token()
    assert token.startswith("at-")
    assert await source.get_token() == token
    grant = server.requests[-1]
    assert grant["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    assert server.counts["urn:ietf:params:oauth:grant-type:jwt-bearer"] == 1
    stats = source.statistics()
    assert stats.account == "mailer@example.com"
    assert stats.expires_at is not None and 3500 < stats.expires_at - clock.now <= 3600
    clock.advance(3600 - 590)
    assert await source.get_token() != token


async def test_service_account_unknown_to_the_server_is_permanent(tmp_path: Path, server: FakeTokenServer) -> None:
    key_file = write_key(tmp_path)
    sa = service_account_file(tmp_path, server)
    server.service_accounts.clear()           # e.g. delegation revoked / key deleted
    cfg = write_oauth_config(tmp_path, f"""
        provider: google
        service_account_file: {sa}
        subject: mailer@example.com
        token_url: {server.token_url}
    """, name="gmail")
    source = build_token_source(smarthost(cfg, "gmail"), state_dir=tmp_path / "state", key_file=key_file)
    with pytest.raises(OAuthError) as info:
        await source.get_token()
    assert info.value.permanent
    assert "domain-wide delegation" in info.value.hint


def user_config(tmp_path: Path, server: FakeTokenServer, key_file: Path) -> Path:
    return write_oauth_config(tmp_path, f"""
        provider: google
        client_id: desktop.apps.googleusercontent.com
        client_secret: "{encrypt_with(key_file, CLIENT_SECRET)}"
        token_url: {server.token_url}
    """, username="someone@gmail.com", name="gmail")


async def test_authorize_by_pasted_code_then_refresh_token(tmp_path: Path, server: FakeTokenServer, clock: FakeClock) -> None:
    key_file = write_key(tmp_path)
    cfg = user_config(tmp_path, server, key_file)
    server.auth_codes["4/0Acode"] = "someone@gmail.com"
    wrong = await asyncio.to_thread(run_cli, ["-c", str(cfg), "oauth", "authorize"],
                                    "http://127.0.0.1/?state=other&code=4/0Acode&scope=x\n")
    assert wrong.code == 1
    assert "state mismatch" in wrong.out
    done = await asyncio.to_thread(run_cli, ["-c", str(cfg), "oauth", "authorize"], "4/0Acode\n")
    assert done.code == 0, done.out + done.err
    assert "https://accounts.google.com/o/oauth2/auth?" in done.out
    assert "scope=https%3A%2F%2Fmail.google.com%2F" in done.out
    assert "access_type=offline" in done.out
    exchange = server.requests[-1]
    assert exchange["grant_type"] == "authorization_code" and exchange["code_verifier"]

    source = build_token_source(smarthost(cfg, "gmail"), state_dir=tmp_path / "state", key_file=key_file, clock=clock)
    token = await source.get_token()
    assert server.requests[-1]["grant_type"] == "refresh_token"
    assert server.requests[-1]["refresh_token"] in server.refresh_tokens
    assert source.statistics().account == "someone@gmail.com"
    clock.advance(3600)
    assert await source.get_token() != token

    # Access revoked in the Google account: invalid_grant -> permanent, re-authorize.
    server.refresh_tokens.clear()
    clock.advance(3600)
    with pytest.raises(OAuthError) as info:
        await source.get_token()
    assert info.value.permanent
    assert "relayd oauth authorize --smarthost gmail" in info.value.hint
    report = await asyncio.to_thread(run_cli, ["-c", str(cfg), "oauth", "token", "--smarthost", "gmail"])
    assert report.code == 1
    assert "invalid_grant" in report.out and "relayd oauth authorize --smarthost gmail" in report.out


async def test_refresh_token_file_and_endpoint_down(tmp_path: Path, server: FakeTokenServer, clock: FakeClock) -> None:
    key_file = write_key(tmp_path)
    server.refresh_tokens["1//rt-from-file"] = "someone@gmail.com"
    rt_file = tmp_path / "gmail.rt"
    rt_file.write_text(encrypt_with(key_file, "1//rt-from-file") + "\n")   # enc: in the file works
    cfg = write_oauth_config(tmp_path, f"""
        provider: google
        client_id: desktop.apps.googleusercontent.com
        client_secret: "{encrypt_with(key_file, CLIENT_SECRET)}"
        token_url: {server.token_url}
        refresh_token_file: {rt_file}
    """, name="gmail")
    source = build_token_source(smarthost(cfg, "gmail"), state_dir=tmp_path / "state", key_file=key_file, clock=clock)
    server.stop()
    with pytest.raises(OAuthError) as info:
        await source.get_token()
    assert not info.value.permanent
    server.start()
    clock.advance(10)
    assert (await source.get_token()).startswith("at-")
    assert server.requests[-1]["refresh_token"] == "1//rt-from-file"
