"""A fake OAuth2 authorization server on 127.0.0.1 (HTTP or HTTPS with a trustme cert).

Implements just enough of RFC 6749 / Entra ID / Google for relayd's token sources:
client_credentials, refresh_token (optionally rotating), JWT bearer (RFC 7523, signature
checked), device code (RFC 8628, approved at once) and authorization_code; MSAL's OIDC
discovery document. Counts requests per grant, remembers every token it issued (for the
redaction tests) and can be stopped and restarted on the same port (endpoint down).

``TokenServers`` is the factory behind the ``token_server`` fixture: it starts servers for
one test (HTTPS ones with a certificate the OAuth libraries trust) and stops them all.
"""

from __future__ import annotations

import base64
import collections
import itertools
import json
import secrets
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import trustme
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class FakeTokenServer:
    ssl_context: ssl.SSLContext | None = None
    lifetime: int = 3600
    rotate_refresh_tokens: bool = False
    clients: dict[str, str] = field(default_factory=dict)        # client_id -> secret ("" = public)
    refresh_tokens: dict[str, str] = field(default_factory=dict)  # refresh token -> account
    auth_codes: dict[str, str] = field(default_factory=dict)      # code -> account
    service_accounts: dict[str, rsa.RSAPublicKey] = field(default_factory=dict)
    fail_status: int | None = None
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    issued: list[str] = field(default_factory=list)               # every access/refresh token
    requests: list[dict[str, str]] = field(default_factory=list)
    gate: threading.Event | None = None                           # token requests wait on it
    port: int = 0
    _httpd: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _seq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> FakeTokenServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                server._get(self)

            def do_POST(self) -> None:
                server._post(self)

        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        httpd.daemon_threads = True
        if self.ssl_context is not None:
            httpd.socket = self.ssl_context.wrap_socket(httpd.socket, server_side=True)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    @property
    def base(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        return f"{self.base}/token"

    def authority(self, tenant: str = "tenant1") -> str:
        return f"{self.base}/{tenant}"

    # -- helpers for tests ---------------------------------------------------------------------------
    def add_service_account(self, email: str) -> rsa.RSAPrivateKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.service_accounts[email] = key.public_key()
        return key

    @property
    def token_requests(self) -> int:
        return sum(v for k, v in self.counts.items() if k != "discovery")

    # -- HTTP ------------------------------------------------------------------------------------
    def _send(self, h: BaseHTTPRequestHandler, status: int, body: dict[str, Any]) -> None:
        raw = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(raw)))
        h.end_headers()
        h.wfile.write(raw)

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        path = urllib.parse.urlsplit(h.path).path
        if path.endswith("/v2.0/.well-known/openid-configuration"):
            tenant = path.split("/")[1]
            with self._lock:
                self.counts["discovery"] += 1
            root = f"{self.base}/{tenant}"
            self._send(h, 200, {
                "issuer": f"{root}/v2.0",
                "authorization_endpoint": f"{root}/oauth2/v2.0/authorize",
                "token_endpoint": f"{root}/oauth2/v2.0/token",
                "device_authorization_endpoint": f"{root}/oauth2/v2.0/devicecode",
            })
            return
        self._send(h, 404, {"error": "not_found"})

    def _post(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length", "0"))
        form = {k: v[0] for k, v in urllib.parse.parse_qs(h.rfile.read(length).decode()).items()}
        path = urllib.parse.urlsplit(h.path).path
        with self._lock:
            self.requests.append(form)
        if self.gate is not None:
            self.gate.wait(10)
        if path.endswith("/devicecode"):
            with self._lock:
                self.counts["devicecode"] += 1
            code = f"dc-{next(self._seq)}"
            self.auth_codes[code] = "delegated@example.com"
            self._send(h, 200, {"device_code": code, "user_code": "ABCD-EFGH",
                                "verification_uri": "https://microsoft.com/devicelogin",
                                "expires_in": 900, "interval": 1,
                                "message": "To sign in, use a web browser to open the page "
                                           "https://microsoft.com/devicelogin and enter the code ABCD-EFGH"})
            return
        grant = form.get("grant_type", "")
        with self._lock:
            self.counts[grant] += 1
        if self.fail_status is not None:
            self._send(h, self.fail_status, {"error": "temporarily_unavailable"})
            return
        status, body = self._grant(grant, form)
        self._send(h, status, body)

    def _client_ok(self, form: dict[str, str]) -> bool:
        cid = form.get("client_id", "")
        if cid not in self.clients:
            return False
        expected = self.clients[cid]
        return expected == "" or form.get("client_secret") == expected

    def _tokens(self, account: str, *, refresh: bool, scope: str = "", id_token: bool = False,
                client_id: str = "") -> dict[str, Any]:
        n = next(self._seq)
        at = f"at-{n}-{secrets.token_hex(8)}"
        body: dict[str, Any] = {"access_token": at, "token_type": "Bearer",
                                "expires_in": self.lifetime, "scope": scope}
        self.issued.append(at)
        if refresh:
            rt = f"rt-{n}-{secrets.token_hex(8)}"
            self.refresh_tokens[rt] = account
            self.issued.append(rt)
            body["refresh_token"] = rt
        if id_token:
            now = int(time.time())
            claims = {"iss": f"{self.base}/tenant1/v2.0", "sub": "sub1", "aud": client_id,
                      "iat": now, "exp": now + 3600, "oid": "oid1", "tid": "tenant1",
                      "preferred_username": account, "name": "Relay Mailbox"}
            body["id_token"] = ".".join([b64url(b'{"alg":"none","typ":"JWT"}'),
                                         b64url(json.dumps(claims).encode()), ""])
            body["client_info"] = b64url(json.dumps({"uid": "oid1", "utid": "tenant1"}).encode())
        return body

    def _grant(self, grant: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        scope = form.get("scope", "")
        if grant == "client_credentials":
            if not self._client_ok(form):
                return 401, {"error": "invalid_client",
                             "error_description": "AADSTS7000215: Invalid client secret provided."}
            return 200, self._tokens(form["client_id"], refresh=False, scope=scope)
        if grant == "refresh_token":
            if not self._client_ok(form):
                return 401, {"error": "invalid_client", "error_description": "bad client"}
            rt = form.get("refresh_token", "")
            with self._lock:
                account = self.refresh_tokens.get(rt)
                if account is not None and self.rotate_refresh_tokens:
                    del self.refresh_tokens[rt]
            if account is None:
                return 400, {"error": "invalid_grant",
                             "error_description": "Token has been expired or revoked."}
            return 200, self._tokens(account, refresh=self.rotate_refresh_tokens, scope=scope,
                                     id_token="client_info" in form, client_id=form.get("client_id", ""))
        if grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return self._jwt_bearer(form.get("assertion", ""))
        if grant in ("urn:ietf:params:oauth:grant-type:device_code", "device_code"):
            account = self.auth_codes.pop(form.get("device_code", ""), None)
            if account is None:
                return 400, {"error": "expired_token"}
            return 200, self._tokens(account, refresh=True, scope=scope, id_token=True,
                                     client_id=form.get("client_id", ""))
        if grant == "authorization_code":
            if not self._client_ok(form):
                return 401, {"error": "invalid_client"}
            account = self.auth_codes.pop(form.get("code", ""), None)
            if account is None or not form.get("code_verifier"):
                return 400, {"error": "invalid_grant", "error_description": "Bad code."}
            return 200, self._tokens(account, refresh=True, scope=scope)
        return 400, {"error": "unsupported_grant_type"}

    def _jwt_bearer(self, assertion: str) -> tuple[int, dict[str, Any]]:
        try:
            head, payload, sig = assertion.split(".")
            claims = json.loads(b64url_decode(payload))
            key = self.service_accounts[claims["iss"]]
            key.verify(b64url_decode(sig), f"{head}.{payload}".encode(), padding.PKCS1v15(),
                       hashes.SHA256())
        except Exception:
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        # google-auth always names Google's endpoint as audience, whatever token_uri is.
        if claims.get("aud") not in (self.token_url, "https://oauth2.googleapis.com/token"):
            return 400, {"error": "invalid_grant", "error_description": "Invalid audience."}
        account = claims.get("sub") or claims["iss"]
        return 200, self._tokens(account, refresh=False, scope=claims.get("scope", ""))


class TokenServers:
    """Starts ``FakeTokenServer``s for one test; ``stop`` stops every one of them.

    ``token_server(clients={...})`` serves HTTP; ``https=True`` serves HTTPS with a certificate
    for 127.0.0.1 from a test CA, written to ``directory`` and named in REQUESTS_CA_BUNDLE
    (through ``setenv``) so that MSAL and google-auth verify it as they would a real one.
    Any other keyword is a ``FakeTokenServer`` field.
    """

    def __init__(self, directory: Path, setenv: Callable[[str, str], None]) -> None:
        self.directory = directory
        self._setenv = setenv
        self._ca: trustme.CA | None = None
        self.started: list[FakeTokenServer] = []

    def __call__(self, *, https: bool = False, **fields: Any) -> FakeTokenServer:
        if https:
            fields["ssl_context"] = self._tls_context()
        server = FakeTokenServer(**fields).start()
        self.started.append(server)
        return server

    def _tls_context(self) -> ssl.SSLContext:
        if self._ca is None:
            self._ca = trustme.CA()
            bundle = self.directory / "token-server-ca.pem"
            self._ca.cert_pem.write_to_path(str(bundle))
            self._setenv("REQUESTS_CA_BUNDLE", str(bundle))
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ca.issue_cert("127.0.0.1").configure_cert(ctx)
        return ctx

    def stop(self) -> None:
        for server in self.started:
            server.stop()
