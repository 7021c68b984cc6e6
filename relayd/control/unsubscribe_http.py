"""The optional one-click unsubscribe endpoint at ``unsubscribe.http_listen`` (RFC 8058).

A deliberately tiny HTTP/1.1 server on asyncio: it serves only the path of ``unsubscribe.url``.
``POST`` with the body ``List-Unsubscribe=One-Click`` and a genuine token adds the address to
the do-not-email list and only then answers 200; if the list cannot be written it answers
503, never 2xx (SPEC: every acknowledged unsubscribe is recorded; CAN-SPAM, RFC 8058). A
forged token gets 403. ``GET`` only shows a confirmation page whose button POSTs, because
mail security scanners follow links and must not unsubscribe anyone (RFC 8058 §3.1). One
request per connection; bodies over 8 KiB are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import re
from urllib.parse import parse_qs, unquote, urlsplit

from relayd.config.schema import UnsubscribeConfig
from relayd.policy.suppressions import SuppressionList, normalize
from relayd.policy.unsubscribe import verify_token

log = logging.getLogger("relayd.unsubscribe")
_MAX_BODY = 8192
_MAX_HEAD = 16384
_TIMEOUT = 10.0
_PLACEHOLDER = re.compile(r"\{(token|email)\}")


class UrlTemplate:
    """Matches request targets against ``unsubscribe.url`` and pulls out token / email,
    whether they sit in the path (``/u/{token}``) or the query (``?t={token}``)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.path = parts.path or "/"
        pattern, pos = "", 0
        for m in _PLACEHOLDER.finditer(self.path):
            pattern += re.escape(self.path[pos:m.start()]) + f"(?P<{m.group(1)}>[^/]+)"
            pos = m.end()
        self._path_re = re.compile("^" + pattern + re.escape(self.path[pos:]) + "$")
        self._query: dict[str, str] = {}
        for key, values in parse_qs(parts.query, keep_blank_values=True).items():
            hit = _PLACEHOLDER.fullmatch(values[0]) if values else None
            if hit:
                self._query[hit.group(1)] = key

    def match(self, target: str) -> dict[str, str] | None:
        parts = urlsplit(target)
        m = self._path_re.match(parts.path)
        if m is None:
            return None
        found = {k: unquote(v) for k, v in m.groupdict().items()}
        query = parse_qs(parts.query, keep_blank_values=True)
        for name, key in self._query.items():
            if query.get(key):
                found[name] = query[key][0]
        return found


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: sans-serif; max-width: 32em; margin: 3em auto">
<h1>{title}</h1>{body}</body></html>
"""


def _page(title: str, body: str) -> bytes:
    return _PAGE.format(title=html.escape(title), body=body).encode("utf-8")


class UnsubscribeServer:
    """``start()`` binds ``cfg.http_listen`` (port 0 allowed; see ``port``), ``aclose()`` stops.

    There is deliberately no way to answer a valid one-click POST without recording it:
    ``do_not_email.auto_add`` does not apply here (an acknowledged unsubscribe that is not
    recorded breaks CAN-SPAM and RFC 8058).
    """

    def __init__(self, cfg: UnsubscribeConfig, store: SuppressionList) -> None:
        if cfg.url is None or cfg.http_listen is None:
            raise ValueError("unsubscribe.url and unsubscribe.http_listen are required")
        self.cfg = cfg
        self.store = store
        self.template = UrlTemplate(cfg.url)
        self._secret = cfg.secret.reveal().encode("utf-8") if cfg.secret else None
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        listen = self.cfg.http_listen
        assert listen is not None
        self._server = await asyncio.start_server(self._handle, listen.host, listen.port,
                                                  limit=_MAX_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("one-click unsubscribe endpoint listening on %s:%d%s", listen.host, self.port,
                 self.template.path)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def serve_forever(self) -> None:
        """Start (if needed) and serve until cancelled; for an ``asyncio.TaskGroup``."""
        if self._server is None:
            await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.aclose()

    # -- HTTP ----------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body = await asyncio.wait_for(self._respond(reader), _TIMEOUT)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError, ConnectionError):
            status, body = 400, _page("Bad request", "<p>The request could not be read.</p>")
        reason = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
                  405: "Method Not Allowed", 413: "Payload Too Large",
                  500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "Error")
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/html; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
                "Connection: close\r\n")
        if status == 405:
            head += "Allow: GET, POST\r\n"
        with contextlib.suppress(ConnectionError):
            writer.write(head.encode("ascii") + b"\r\n" + body)
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        request_line = (await reader.readuntil(b"\r\n")).decode("latin-1").strip()
        headers: dict[str, str] = {}
        while True:
            line = (await reader.readuntil(b"\r\n")).decode("latin-1")
            if line in ("\r\n", "\n"):
                break
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts = request_line.split()
        if len(parts) != 3:
            return 400, _page("Bad request", "<p>Malformed request.</p>")
        method, target, _ = parts
        length = int(headers.get("content-length", "0") or "0")
        if length > _MAX_BODY:
            return 413, _page("Too large", "<p>Request body too large.</p>")
        body = await reader.readexactly(length) if length > 0 else b""
        found = self.template.match(target)
        if found is None:
            return 404, _page("Not found", "<p>Nothing here.</p>")
        address = self._verify(found)
        if method == "GET" or method == "HEAD":
            if address is None:
                return 403, _page("Invalid link", "<p>This unsubscribe link is not valid.</p>")
            return 200, self._confirm_page(target, address)
        if method != "POST":
            return 405, _page("Not allowed", "<p>Use the button on the page.</p>")
        form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        if form.get("List-Unsubscribe") != ["One-Click"]:
            return 400, _page("Bad request",
                              "<p>Expected the body List-Unsubscribe=One-Click.</p>")
        if address is None:
            log.warning("unsubscribe: refused a forged or damaged token")
            return 403, _page("Invalid link", "<p>This unsubscribe link is not valid.</p>")
        try:
            await asyncio.to_thread(self.store.add, [address], "unsubscribe")
        except Exception as exc:  # whatever the failure, it must not be acknowledged with 2xx
            # The address stays out of the log (it is the recipient's, and logs travel).
            log.error("unsubscribe: cannot record a one-click request in the do-not-email "
                      "list %s (%s); answered 503, so nothing was acknowledged",
                      self.store.location, exc)
            return 503, _page("Try again later", "<p>Your request could not be recorded. "
                              "Please try again later.</p>")
        log.info("unsubscribe: one-click request for a recipient accepted and recorded")
        return 200, _page("Unsubscribed", f"<p>{html.escape(address)} will receive no more "
                          "mail from us.</p>")

    def _verify(self, found: dict[str, str]) -> str | None:
        """The address the request proves, or None. With a ``{token}`` URL the token is
        required and must agree with ``{email}`` if both are present."""
        token, email = found.get("token"), found.get("email")
        if self._secret is None:
            return None  # without a secret nothing can be proven
        if token is None:
            return None
        address = verify_token(self._secret, token)
        if address is None or (email is not None and normalize(email) != address):
            return None
        return address

    def _confirm_page(self, target: str, address: str) -> bytes:
        action = html.escape(target, quote=True)
        return _page("Unsubscribe", (
            f"<p>Stop sending mail to <b>{html.escape(address)}</b>?</p>"
            f'<form method="post" action="{action}">'
            '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
            '<button type="submit">Unsubscribe</button></form>'))


async def serve_unsubscribe(cfg: UnsubscribeConfig, store: SuppressionList, *,
                            ready: asyncio.Event | None = None) -> None:
    """Run the endpoint until cancelled; ``ready`` is set once it listens."""
    server = UnsubscribeServer(cfg, store)
    await server.start()
    if ready is not None:
        ready.set()
    await server.serve_forever()
