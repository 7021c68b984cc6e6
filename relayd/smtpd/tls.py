"""Server TLS for the submission listeners: the certificate, swapped on SIGHUP without a restart.

Each listener keeps one ``ServerTls``. ``reload()`` builds a fresh SSLContext from
``cert_file`` / ``key_file`` (certbot's renewal replaces both) and makes it current only when
it loaded: a half-written or mismatched pair keeps the running certificate. Sessions already
open keep the certificate they were handed; new ones get the new one: STARTTLS sessions
(RFC 3207) take ``current`` when they are created, and implicit-TLS ones (RFC 8314 §3.3),
whose server socket was bound with the first context, are switched to ``current`` in the
ClientHello callback, which OpenSSL calls for every handshake, with or without SNI.
"""

from __future__ import annotations

import ssl
from pathlib import Path


def load_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server context for ``cert_file`` (full chain) and ``key_file``; ssl.SSLError or
    OSError when they cannot be read or do not belong together. Blocking (file reads)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # RFC 8996: no TLS 1.0/1.1; RFC 8314 §4.1: TLS 1.2 or later for submission.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


class ServerTls:
    """The current server context of one listener (see the module docstring)."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.current = self._prepare(load_context(cert_file, key_file))

    def _prepare(self, ctx: ssl.SSLContext) -> ssl.SSLContext:
        ctx.sni_callback = self._pick
        return ctx

    def _pick(self, sslobj: ssl.SSLObject | ssl.SSLSocket, _name: str | None,
              ctx: ssl.SSLContext) -> None:
        if ctx is not self.current:
            sslobj.context = self.current

    def reload(self, cert_file: Path, key_file: Path) -> None:
        """Load the files again (blocking); the old context stays when they do not load."""
        new = load_context(cert_file, key_file)
        self.cert_file, self.key_file = cert_file, key_file
        self.current = self._prepare(new)
