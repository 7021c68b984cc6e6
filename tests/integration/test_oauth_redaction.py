"""No secret, client secret, refresh token or access token in logs or command output.

Every logger (relayd's and the libraries': MSAL, google-auth, urllib3, requests) is captured at
DEBUG while the OAuth flows run, successes and failures alike, together with the output of the
``relayd secret`` / ``relayd oauth`` commands, reprs of the records and exception texts.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from relayd.errors import OAuthError
from relayd.oauth.source import build_token_source
from tests.integration.test_oauth_xoauth2 import send_with_xoauth2
from tests.support.clock import FakeClock
from tests.support.oauth_helpers import run_cli, smarthost, write_oauth_config
from tests.support.oauth_server import FakeTokenServer, TokenServers
from tests.support.xoauth2_upstream import XOAuth2Handler, start_upstream

CLIENT_SECRET = "CLIENT-SECRET-never-shown-7d1f"
AZURE_SECRET = "AZURE-SECRET-never-shown-93ab"
INITIAL_RT = "REFRESH-never-shown-55c2"
AUTH_CODE = "4/AUTHCODE-never-shown-0e0e"


def forbidden(server: FakeTokenServer, extra: list[str]) -> list[str]:
    values = [CLIENT_SECRET, AZURE_SECRET, INITIAL_RT, AUTH_CODE, *server.issued, *extra]
    # Also the base64 forms (an AUTH payload in a transcript would be base64).
    sasl = [base64.b64encode(f"user=relay@example.com\x01auth=Bearer {t}\x01\x01".encode()).decode()
            for t in server.issued]
    return [v for v in values + sasl if v]


def collected_text(caplog: pytest.LogCaptureFixture, outputs: list[str]) -> str:
    parts = list(outputs)
    for rec in caplog.records:
        if rec.name.startswith("mail.log"):
            continue   # the test's own fake upstream, not relayd
        parts.append(rec.getMessage())
        if rec.exc_info and rec.exc_info[1] is not None:
            parts.append(repr(rec.exc_info[1]))
    return "\n".join(parts)


async def test_no_secret_or_token_in_any_output(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                token_server: TokenServers) -> None:
    caplog.set_level(logging.DEBUG)
    server = token_server(https=True, rotate_refresh_tokens=True,
                          clients={"app1": CLIENT_SECRET, "azure-app": AZURE_SECRET, "public-app": ""})
    outputs: list[str] = []

    def cli(argv: list[str], stdin: str = "", cwd: Path = tmp_path) -> int:
        result = run_cli(["-c", str(cwd / "relayd.yaml"), *argv], stdin)
        outputs.extend([result.out, result.err])
        return result.code

    (tmp_path / "relayd.yaml").write_text("secrets: {key_file: secret.key}\n")
    assert await asyncio.to_thread(cli, ["secret", "keygen"]) == 0
    key_text = (tmp_path / "secret.key").read_text().strip()
    enc = {}
    for name, value in (("client", CLIENT_SECRET), ("azure", AZURE_SECRET), ("rt", INITIAL_RT)):
        run = run_cli(["-c", str(tmp_path / "relayd.yaml"), "secret", "encrypt"], value + "\n")
        outputs.append(run.err)
        enc[name] = run.out.strip()
    (tmp_path / "rt").write_text(enc["rt"])
    server.refresh_tokens[INITIAL_RT] = "relay@example.com"
    sa_key = server.add_service_account("sa@p.iam.gserviceaccount.com")
    pem = sa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption()).decode()
    (tmp_path / "sa.json").write_text(json.dumps({
        "type": "service_account", "private_key_id": "k", "private_key": pem,
        "client_email": "sa@p.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": server.token_url}))

    configs = {
        "generic-cc": f"provider: generic\ntoken_url: {server.token_url}\nclient_id: app1\nclient_secret: \"{enc['client']}\"",
        "generic-rt": f"provider: generic\ntoken_url: {server.token_url}\nclient_id: app1\nclient_secret: \"{enc['client']}\"\ngrant: refresh_token\nrefresh_token_file: {tmp_path / 'rt'}",
        "azure-app": f"provider: azure\ntenant_id: tenant1\nclient_id: azure-app\nclient_secret: \"{enc['azure']}\"\nauthority: {server.authority()}",
        "azure-bad": f"provider: azure\ntenant_id: tenant1\nclient_id: azure-app\nclient_secret: \"{enc['client']}\"\nauthority: {server.authority()}",
        "azure-delegated": f"provider: azure\ntenant_id: tenant1\nclient_id: public-app\nauthority: {server.authority()}",
        "google-sa": f"provider: google\nservice_account_file: {tmp_path / 'sa.json'}\nsubject: relay@example.com\ntoken_url: {server.token_url}",
        "google-user": f"provider: google\nclient_id: app1\nclient_secret: \"{enc['client']}\"\ntoken_url: {server.token_url}",
    }
    for name, oauth in configs.items():
        sub = tmp_path / name
        sub.mkdir()
        (sub / "secret.key").write_text(key_text + "\n")
        write_oauth_config(sub, oauth, name=name)
        if name == "azure-delegated":
            assert await asyncio.to_thread(cli, ["oauth", "authorize"], "", sub) == 0
        if name == "google-user":
            server.auth_codes[AUTH_CODE] = "relay@example.com"
            assert await asyncio.to_thread(cli, ["oauth", "authorize"], AUTH_CODE + "\n", sub) == 0
        expected = 1 if name == "azure-bad" else 0
        assert await asyncio.to_thread(cli, ["oauth", "token"], "", sub) == expected, outputs[-2:]
        assert await asyncio.to_thread(cli, ["check-config"], "", sub) == 0

        clock = FakeClock()
        source = build_token_source(smarthost(sub / "relayd.yaml", name), state_dir=sub / "state",
                                    key_file=sub / "secret.key", clock=clock)
        try:
            token = await source.get_token()
        except OAuthError as exc:
            outputs.extend([str(exc), exc.hint, repr(exc)])
            continue
        outputs.append(repr(await source.token()))
        outputs.append(repr(source.statistics()))
        handler = XOAuth2Handler("relay@example.com", valid={token})
        upstream, port = await start_upstream(handler)
        try:
            assert (await send_with_xoauth2(port, source)).code == 235
            # Token rejected now: the 334 challenge, invalidate, one refresh.
            handler.valid.clear()
            server_tokens = server._tokens

            def issue(*a: object, _h: XOAuth2Handler = handler, _t: object = server_tokens, **kw: object) -> dict[str, object]:
                body = _t(*a, **kw)  # type: ignore[operator]
                _h.valid.add(str(body["access_token"]))
                return body  # type: ignore[no-any-return]

            server._tokens = issue  # type: ignore[method-assign]
            try:
                assert (await send_with_xoauth2(port, source)).code == 235
            finally:
                server._tokens = server_tokens  # type: ignore[method-assign]
        finally:
            upstream.close()
            await upstream.wait_closed()
    # A dead refresh token, reported by the command.
    server.refresh_tokens.clear()
    assert await asyncio.to_thread(cli, ["oauth", "token"], "", tmp_path / "generic-rt") == 1
    assert "relayd oauth authorize" in outputs[-2]

    text = collected_text(caplog, outputs)
    assert "token OK" in text and "expires" in text          # the outputs were really captured
    assert len(server.issued) > 10
    for value in forbidden(server, [key_text, *pem.splitlines()[1:-1]]):
        assert value not in text, f"leaked: {value[:12]}..."
    # The on-disk state never holds a token in clear either.
    for f in tmp_path.rglob("state/oauth/*"):
        blob = f.read_bytes()
        for value in server.issued:
            assert value.encode() not in blob
