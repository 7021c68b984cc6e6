"""``relayd send-test`` end to end: config file -> cli.main -> fake upstream on loopback.

cli.main runs its own event loop, so it runs in a worker thread while the fake upstream
serves on the test's loop.
"""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any

import pytest

from relayd import cli
from tests.support.config_builder import ConfigBuilder
from tests.support.oauth_server import FakeTokenServer
from tests.support.ports import free_port
from tests.support.upstream import FakeUpstream

PASSWORD = "Sup3r-Secret-pw"


def smarthost_entry(up: FakeUpstream | None, *, name: str = "primary", port: int | None = None,
                    **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "host": "127.0.0.1", "timeout": "1s"}
    if up is not None:
        entry.update(port=up.port, tls=up.tls, ca_file=str(up.ca_file))
    else:
        entry.update(port=port, tls="none")
    entry.update(extra)
    return entry


async def send_test(config: Path, *args: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    argv = ["-c", str(config), "send-test", *args]
    code = await asyncio.to_thread(cli.main, argv, io=cli.IO(out, err, io.StringIO()))
    return code, out.getvalue() + err.getvalue()


def assert_no_secret(output: str) -> None:
    for form in (PASSWORD, base64.b64encode(PASSWORD.encode()).decode(),
                 base64.b64encode(f"\0relay@example.com\0{PASSWORD}".encode()).decode()):
        assert form not in output


def auth(method: str = "auto", password: str = PASSWORD) -> dict[str, Any]:
    return {"method": method, "username": "relay@example.com", "password": password}


async def test_success_prints_the_conversation_and_leaves_no_spool(tmp_path: Path, config_builder: ConfigBuilder) -> None:
    async with FakeUpstream(tls="starttls", auth=("PLAIN", "LOGIN"),
                            credentials={"relay@example.com": PASSWORD}, require_auth=True) as up:
        config = config_builder.write([smarthost_entry(up, auth=auth())])
        code, output = await send_test(config, "--to", "ops@example.net")
        assert code == 0
        assert "result: delivered" in output and "send-test: delivered" in output
        assert "C: STARTTLS" in output and "C: AUTH PLAIN <redacted>" in output
        # the authenticated mailbox is the default sender (O365/Gmail refuse others)
        assert up.messages[0].mail_from == "relay@example.com"
        assert up.messages[0].rcpt_tos == ["ops@example.net"]
        assert b"Subject: relayd test message via primary" in up.messages[0].data
        assert_no_secret(output)
    assert not (tmp_path / "spool").exists() or not any((tmp_path / "spool").rglob("*"))


async def test_from_option_sets_the_sender(config_builder: ConfigBuilder) -> None:
    async with FakeUpstream() as up:
        config = config_builder.write([smarthost_entry(up)])
        code, _ = await send_test(config, "--to", "ops@example.net", "--from", "me@example.com")
        assert code == 0
        assert up.messages[0].mail_from == "me@example.com"
        assert b"From: <me@example.com>" in up.messages[0].data


@pytest.mark.parametrize(("fake", "entry", "expected"), [
    ({"tls": "starttls", "auth": ("PLAIN",), "credentials": {"relay@example.com": "other"}},
     {"auth": auth()}, "App Password"),
    ({"tls": "starttls", "auth": ("LOGIN",), "credentials": {},
      "auth_failure": "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant."},
     {"auth": auth()}, "Authenticated SMTP"),
    ({"tls": "starttls", "auth": ("PLAIN", "LOGIN"), "refuse_plain": True,
      "credentials": {"relay@example.com": PASSWORD}},
     {"auth": auth("plain")}, "auth.method: auto"),
    ({"tls": "starttls", "replies": {"dot": "554 5.2.252 SendAsDenied; relay@example.com not allowed to send as boss@example.com"}},
     {}, "authenticated mailbox as From"),
    ({"tls": "starttls", "require_starttls": True}, {"tls": "none"}, "tls: starttls"),
    ({"tls": "starttls"}, {"ca_file": "OTHER"}, "ca_file"),
    ({"tls": "none"}, {"tls": "starttls"}, "STARTTLS"),
    ({"replies": {"mail": "554 Message rejected: Email address is not verified. The following identities failed the check"}},
     {}, "Verify the From domain"),
    ({"replies": {"rcpt": {"ops@example.net": "450 4.7.1 Domain example.com not verified"}}},
     {}, "Verify the From domain"),
    ({"replies": {"greeting": "421 4.3.2 Service not available"}}, {}, "status page"),
    ({"hang_at": "greeting"}, {"timeout": "0.3s"}, "try port 587"),
])
async def test_failure_diagnosis(config_builder: ConfigBuilder, fake: dict[str, Any], entry: dict[str, Any],
                                 expected: str) -> None:
    async with FakeUpstream(**fake) as up:
        if entry.get("ca_file") == "OTHER":
            entry = {**entry, "ca_file": str(up.other_ca_file)}
        config = config_builder.write([smarthost_entry(up, **entry)])
        code, output = await send_test(config, "--to", "ops@example.net")
        assert code == 1
        assert "send-test: NOT delivered" in output
        assert "meaning:" in output and "fix:" in output
        assert expected in output
        assert_no_secret(output)


async def test_connection_refused_suggests_port_587(config_builder: ConfigBuilder) -> None:
    port = free_port()
    config = config_builder.write([smarthost_entry(None, port=port)])
    code, output = await send_test(config, "--to", "ops@example.net")
    assert code == 1
    assert "Connection refused" in output and "587" in output


async def test_falls_back_to_the_next_smarthost(config_builder: ConfigBuilder) -> None:
    dead = free_port()
    async with FakeUpstream() as up:
        config = config_builder.write([smarthost_entry(None, name="dead", port=dead),
                                       smarthost_entry(up, name="backup")])
        code, output = await send_test(config, "--to", "ops@example.net")
        assert code == 0
        assert "smarthost dead[" in output and "smarthost backup[" in output
        assert len(up.messages) == 1


async def test_named_smarthost_only(config_builder: ConfigBuilder) -> None:
    async with FakeUpstream() as first, FakeUpstream() as second:
        config = config_builder.write([smarthost_entry(first, name="one"),
                                       smarthost_entry(second, name="two")])
        code, _ = await send_test(config, "--to", "ops@example.net", "--smarthost", "two")
        assert code == 0
        assert first.messages == [] and len(second.messages) == 1


async def test_unknown_smarthost_name_fails(config_builder: ConfigBuilder) -> None:
    async with FakeUpstream() as up:
        config = config_builder.write([smarthost_entry(up, name="one")])
        code, output = await send_test(config, "--to", "ops@example.net", "--smarthost", "nope")
        assert code == 1
        assert "nope" in output and "one" in output


async def test_outbox_smarthost_writes_the_test_message(tmp_path: Path, config_builder: ConfigBuilder) -> None:
    config = config_builder.write([{"name": "preview", "outbox": str(tmp_path / "outbox")}])
    code, output = await send_test(config, "--to", "ops@example.net")
    assert code == 0
    assert "written to send-test.eml" in output
    assert (tmp_path / "outbox" / "send-test.eml").exists()


async def test_xoauth2_without_a_usable_token_explains_oauth(config_builder: ConfigBuilder) -> None:
    async with FakeUpstream(tls="starttls", auth=("XOAUTH2",)) as up:
        entry = smarthost_entry(up, auth={
            "method": "xoauth2", "username": "relay@example.com",
            "oauth": {"provider": "generic", "token_url": "http://127.0.0.1:9/token",
                      "client_id": "cid", "client_secret": PASSWORD}})
        config = config_builder.write([entry])
        code, output = await send_test(config, "--to", "ops@example.net")
        assert code == 1
        assert "oauth" in output.lower()
        assert up.messages == []
        assert_no_secret(output)


async def test_xoauth2_fetches_a_token_and_delivers(config_builder: ConfigBuilder) -> None:
    """send-test builds the smarthost's token source itself. (It once looked it up by a module
    name that a move had changed, and then reported every XOAUTH2 smarthost as "OAuth
    support is not available".)"""
    server = FakeTokenServer(clients={"cid": PASSWORD}).start()
    try:
        async with FakeUpstream(tls="starttls", auth=("XOAUTH2",)) as up:
            issue = server._tokens

            def issue_and_accept(*args: Any, **kw: Any) -> dict[str, Any]:
                body = issue(*args, **kw)
                up.tokens.add(str(body["access_token"]))   # the upstream accepts what it issues
                return body

            server._tokens = issue_and_accept  # type: ignore[method-assign]
            entry = smarthost_entry(up, auth={
                "method": "xoauth2", "username": "relay@example.com",
                "oauth": {"provider": "generic", "token_url": server.token_url,
                          "client_id": "cid", "client_secret": PASSWORD}})
            code, output = await send_test(config_builder.write([entry]), "--to", "ops@example.net")
            assert code == 0, output
            assert len(up.messages) == 1
            assert server.counts["client_credentials"] == 1
            assert_no_secret(output)
            assert not any(token in output for token in server.issued)
    finally:
        server.stop()
