"""Token lifecycle against a local RFC 6749 token endpoint (provider: generic)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from relayd.errors import OAuthError
from relayd.oauth.source import OAuthTokenSource, TokenStatistics, build_token_source
from tests.support.clock import FakeClock
from tests.support.oauth_helpers import encrypt_with, smarthost, write_key, write_oauth_config
from tests.support.oauth_server import FakeTokenServer, TokenServers

SECRET = "client-secret-XYZ-123"


@pytest.fixture
def server(token_server: TokenServers) -> FakeTokenServer:
    return token_server(clients={"app1": SECRET})


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return write_key(tmp_path)


def cc_source(tmp_path: Path, server: FakeTokenServer, key_file: Path, clock: FakeClock,
              **kw: object) -> OAuthTokenSource:
    cfg = write_oauth_config(tmp_path, f"""
        provider: generic
        token_url: {server.token_url}
        client_id: app1
        client_secret: "{encrypt_with(key_file, SECRET)}"
        scope: smtp.send
        grant: client_credentials
    """)
    return build_token_source(smarthost(cfg), state_dir=tmp_path / "state", key_file=key_file,
                              clock=clock, **kw)  # type: ignore[arg-type]


async def test_token_is_fetched_once_and_reused(tmp_path: Path, server: FakeTokenServer, key_file: Path, clock: FakeClock) -> None:
    source = cc_source(tmp_path, server, key_file, clock)
    tokens = {await source.get_token() for _ in range(50)}
    assert len(tokens) == 1
    assert server.counts["client_credentials"] == 1
    assert server.requests[0]["scope"] == "smtp.send"
    stats = source.statistics()
    assert stats.expires_at == clock.now + 3600
    assert stats.account == "relay@example.com"


async def test_refreshed_ten_minutes_before_expiry(tmp_path: Path, server: FakeTokenServer, key_file: Path, clock: FakeClock) -> None:
    source = cc_source(tmp_path, server, key_file, clock)
    first = await source.get_token()
    clock.advance(3600 - 601)          # 10 min + 1 s before expiry: still good
    assert await source.get_token() == first
    clock.advance(2)                   # inside the 10-minute margin: refreshed
    second = await source.get_token()
    assert second != first
    assert server.counts["client_credentials"] == 2
    clock.advance(7200)                # long expired
    assert await source.get_token() not in (first, second)
    assert server.counts["client_credentials"] == 3


async def test_short_lived_tokens_refresh_at_half_life(tmp_path: Path, server: FakeTokenServer, key_file: Path, clock: FakeClock) -> None:
    server.lifetime = 300              # shorter than the margin: not refetched on every call
    source = cc_source(tmp_path, server, key_file, clock)
    first = await source.get_token()
    clock.advance(149)
    assert await source.get_token() == first
    clock.advance(2)
    assert await source.get_token() != first
    assert server.counts["client_credentials"] == 2


async def test_invalidate_causes_exactly_one_refresh(tmp_path: Path, server: FakeTokenServer, key_file: Path, clock: FakeClock) -> None:
    source = cc_source(tmp_path, server, key_file, clock)
    first = await source.get_token()
    source.invalidate(first)
    source.invalidate(first)           # a second report of the same token changes nothing
    second = await source.get_token()
    assert second != first
    source.invalidate("some-older-token")   # not the current one: kept
    assert await source.get_token() == second
    assert server.counts["client_credentials"] == 2


async def test_concurrent_callers_share_one_request(tmp_path: Path, server: FakeTokenServer, key_file: Path, clock: FakeClock) -> None:
    server.gate = threading.Event()    # hold the endpoint until every caller is waiting
    source = cc_source(tmp_path, server, key_file, clock)
    tasks = [asyncio.create_task(source.get_token()) for _ in range(20)]
    for _ in range(100):
        await asyncio.sleep(0)         # let every task reach the lock
    server.gate.set()
    tokens = await asyncio.gather(*tasks)
    assert len(set(tokens)) == 1
    assert server.counts["client_credentials"] == 1


async def test_endpoint_down_is_temporary_then_recovers(tmp_path: Path, server: FakeTokenServer, key_file: Path, clock: FakeClock) -> None:
    statuses: list[TokenStatistics] = []
    source = cc_source(tmp_path, server, key_file, clock, on_status=statuses.append)
    server.stop()
    with pytest.raises(OAuthError) as info:
        await source.get_token()
    assert info.value.permanent is False
    assert "cannot reach the token endpoint" in str(info.value)
    # Within the back-off, callers get the same error without hammering the endpoint.
    with pytest.raises(OAuthError):
        await source.get_token()
    assert source.statistics().failures == 1
    server.start()                     # back on the same port
    clock.advance(6)
    assert (await source.get_token()).startswith("at-")
    assert source.statistics().last_error is None
    assert [s.last_error is None for s in statuses] == [False, True]


async def test_server_error_is_temporary(tmp_path: Path, server: FakeTokenServer, key_file: Path, clock: FakeClock) -> None:
    server.fail_status = 503
    source = cc_source(tmp_path, server, key_file, clock)
    with pytest.raises(OAuthError) as info:
        await source.get_token()
    assert not info.value.permanent
    assert "HTTP 503" in str(info.value)


async def test_wrong_client_secret_is_permanent(tmp_path: Path, server: FakeTokenServer, key_file: Path, clock: FakeClock) -> None:
    server.clients["app1"] = "another-secret"
    source = cc_source(tmp_path, server, key_file, clock)
    with pytest.raises(OAuthError) as info:
        await source.get_token()
    assert info.value.permanent
    assert "invalid_client" in str(info.value)
    assert "client_secret" in info.value.hint
    assert SECRET not in str(info.value) + info.value.hint


def rt_config(tmp_path: Path, server: FakeTokenServer, rt_file: Path) -> Path:
    return write_oauth_config(tmp_path, f"""
        provider: generic
        token_url: {server.token_url}
        client_id: app1
        client_secret_file: {tmp_path / 'client_secret'}
        grant: refresh_token
        refresh_token_file: {rt_file}
    """)


async def test_refresh_token_rotation_is_saved_encrypted(tmp_path: Path, server: FakeTokenServer, key_file: Path, clock: FakeClock) -> None:
    server.rotate_refresh_tokens = True
    server.refresh_tokens["rt-initial"] = "relay@example.com"
    (tmp_path / "client_secret").write_text(SECRET + "\n")
    rt_file = tmp_path / "refresh_token"
    rt_file.write_text("rt-initial\n")
    cfg = rt_config(tmp_path, server, rt_file)
    source = build_token_source(smarthost(cfg), state_dir=tmp_path / "state", key_file=key_file, clock=clock)
    first = await source.get_token()
    assert server.requests[-1]["refresh_token"] == "rt-initial"
    clock.advance(3600)
    # The old refresh token was revoked on rotation; the new one is used and works.
    second = await source.get_token()
    assert second != first
    assert server.requests[-1]["refresh_token"] != "rt-initial"
    state_files = list((tmp_path / "state" / "oauth").iterdir())
    for f in state_files:
        blob = f.read_bytes()
        for tok in server.issued:
            assert tok.encode() not in blob
    # A restarted daemon uses the rotated token too (and the cached access token).
    restarted = build_token_source(smarthost(cfg), state_dir=tmp_path / "state", key_file=key_file, clock=clock)
    assert await restarted.get_token() == second
    clock.advance(3600)
    await restarted.get_token()
    assert server.counts["refresh_token"] == 3
    # An operator who writes a new token into refresh_token_file overrides the stored one.
    server.refresh_tokens["rt-replaced"] = "relay@example.com"
    rt_file.write_text("rt-replaced\n")
    clock.advance(3600)
    await restarted.get_token()
    assert server.requests[-1]["refresh_token"] == "rt-replaced"


async def test_invalid_grant_is_permanent_with_authorize_hint(tmp_path: Path, server: FakeTokenServer, key_file: Path, clock: FakeClock) -> None:
    (tmp_path / "client_secret").write_text(SECRET)
    rt_file = tmp_path / "refresh_token"
    rt_file.write_text("rt-revoked\n")
    statuses: list[TokenStatistics] = []
    source = build_token_source(smarthost(rt_config(tmp_path, server, rt_file)), state_dir=tmp_path / "state",
                                key_file=key_file, clock=clock, on_status=statuses.append)
    with pytest.raises(OAuthError) as info:
        await source.get_token()
    assert info.value.permanent
    assert "invalid_grant" in str(info.value)
    assert "relayd oauth authorize --smarthost m365" in info.value.hint
    assert statuses[-1].last_error_permanent
    assert "rt-revoked" not in str(info.value)


async def test_cache_survives_restart_and_is_encrypted(tmp_path: Path, server: FakeTokenServer, key_file: Path, clock: FakeClock) -> None:
    first = await cc_source(tmp_path, server, key_file, clock).get_token()
    cache = next((tmp_path / "state" / "oauth").glob("*.token"))
    assert first.encode() not in cache.read_bytes()
    assert cache.stat().st_mode & 0o777 == 0o600
    again = cc_source(tmp_path, server, key_file, clock)
    assert await again.get_token() == first
    assert server.counts["client_credentials"] == 1
    assert again.statistics().expires_at == clock.now + 3600
    # A different key cannot read it: the token is simply fetched anew.
    other_key = tmp_path / "other.key"
    other_key.write_bytes(key_file.read_bytes())
    (tmp_path / "k2").mkdir()
    fresh_key = write_key(tmp_path / "k2")
    cfg_source = build_token_source(
        smarthost(write_oauth_config(tmp_path, f"""
            provider: generic
            token_url: {server.token_url}
            client_id: app1
            client_secret: "{encrypt_with(key_file, SECRET)}"
            scope: smtp.send
            grant: client_credentials
        """)), state_dir=tmp_path / "state", key_file=fresh_key, clock=clock)
    assert await cfg_source.get_token() != first


async def test_changed_settings_discard_the_cache(tmp_path: Path, server: FakeTokenServer, key_file: Path, clock: FakeClock) -> None:
    first = await cc_source(tmp_path, server, key_file, clock).get_token()
    cfg = write_oauth_config(tmp_path, f"""
        provider: generic
        token_url: {server.token_url}
        client_id: app1
        client_secret: "{encrypt_with(key_file, SECRET)}"
        scope: another.scope
    """)
    source = build_token_source(smarthost(cfg), state_dir=tmp_path / "state", key_file=key_file, clock=clock)
    assert await source.get_token() != first


async def test_missing_key_file_still_gives_tokens_in_memory(tmp_path: Path, server: FakeTokenServer,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_oauth_config(tmp_path, f"""
        provider: generic
        token_url: {server.token_url}
        client_id: app1
        client_secret_env: RELAYD_TEST_SECRET
    """)
    monkeypatch.setenv("RELAYD_TEST_SECRET", SECRET)
    sh = smarthost(cfg)
    source = build_token_source(sh, state_dir=tmp_path / "state", key_file=tmp_path / "absent.key")
    token = await source.get_token()
    assert token == await source.get_token()
    assert not (tmp_path / "state" / "oauth").exists() or not list((tmp_path / "state" / "oauth").glob("*.token"))


def test_oauth_token_command_prints_account_and_expiry_never_the_token(tmp_path: Path, server: FakeTokenServer, key_file: Path, clock: FakeClock) -> None:
    from tests.support.oauth_helpers import run_cli

    cc_source(tmp_path, server, key_file, clock)     # writes the config
    result = run_cli(["-c", str(tmp_path / "relayd.yaml"), "oauth", "token", "--smarthost", "m365"])
    assert result.code == 0, result.out + result.err
    assert result.out.startswith("m365: token OK for relay@example.com via generic client_credentials")
    assert "expires 20" in result.out and "(in 59 min)" in result.out
    assert server.issued and all(t not in result.out + result.err for t in server.issued)
    unknown = run_cli(["-c", str(tmp_path / "relayd.yaml"), "oauth", "token", "--smarthost", "nope"])
    assert unknown.code == 1 and "no smarthost named 'nope'" in unknown.err
    server.clients.clear()
    failed = run_cli(["-c", str(tmp_path / "relayd.yaml"), "oauth", "token"])
    assert failed.code == 1
    assert "m365: no token (needs action)" in failed.out and "what to do:" in failed.out


async def test_unusable_settings_fail_at_first_use_not_at_build(tmp_path: Path, key_file: Path) -> None:
    from relayd.config.schema import AuthConfig, AuthMethod, OAuthConfig, OAuthProvider, Smarthost
    from relayd.secrets import Secret

    sh = Smarthost(name="m365", host="smtp.office365.com", auth=AuthConfig(
        method=AuthMethod.XOAUTH2, username="relay@example.com",
        oauth=OAuthConfig(provider=OAuthProvider.AZURE, client_id="c", client_secret=Secret("s"))))
    source = build_token_source(sh, state_dir=tmp_path / "state", key_file=key_file)
    with pytest.raises(OAuthError) as info:
        await source.get_token()
    assert info.value.permanent and "tenant_id" in str(info.value)


def test_check_config_requires_tenant_for_azure_app_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.support.oauth_helpers import run_cli

    cfg = write_oauth_config(tmp_path, """
        provider: azure
        client_id: c
        client_secret_env: AZ_SECRET
    """)
    monkeypatch.setenv("AZ_SECRET", "x")
    result = run_cli(["-c", str(cfg), "check-config"])
    assert result.code == 1
    assert "smarthosts[0].auth.oauth.tenant_id: is required for provider azure with client_secret (app-only)" in result.out


async def test_unwritable_state_dir_still_gives_tokens(tmp_path: Path, server: FakeTokenServer, key_file: Path,
                                                       caplog: pytest.LogCaptureFixture, clock: FakeClock) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    cfg_source = cc_source(tmp_path, server, key_file, clock)
    source = build_token_source(smarthost(tmp_path / "relayd.yaml"), state_dir=blocked, key_file=key_file)
    assert cfg_source is not None
    token = await source.get_token()
    assert await source.get_token() == token
    assert "token cache not used" in caplog.text
