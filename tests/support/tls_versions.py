"""TLS protocol versions for test servers: a server that speaks only TLS 1.0 and 1.1, and whether
this machine's OpenSSL can still be one.

OpenSSL 3 keeps TLS 1.0 and 1.1 but refuses them below security level 0 (their handshakes sign
with SHA-1/MD5), and some builds leave them out entirely (``no-tls1``, ``no-tls1_1``). Python
warns (DeprecationWarning) whenever a context is limited to them; the suite turns warnings into
errors, so the limits are set here with that warning silenced.
"""

from __future__ import annotations

import functools
import ssl
import warnings

import trustme

LEGACY: tuple[ssl.TLSVersion, ssl.TLSVersion] = (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1)
MODERN: tuple[ssl.TLSVersion, ssl.TLSVersion] = (ssl.TLSVersion.TLSv1_2,
                                                 ssl.TLSVersion.MAXIMUM_SUPPORTED)


def limit_versions(ctx: ssl.SSLContext, versions: tuple[ssl.TLSVersion, ssl.TLSVersion]) -> None:
    """Negotiate only ``versions`` (minimum, maximum) with ``ctx`` from now on; versions
    below TLS 1.2 lower OpenSSL's security level to 0 so that they can be negotiated at all."""
    minimum, maximum = versions
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if minimum < ssl.TLSVersion.TLSv1_2:
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        # Widen before narrowing, so that minimum never exceeds maximum on the way.
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = maximum
        ctx.minimum_version = minimum


def _pump(sides: list[tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]]) -> bool:
    """Run an in-memory handshake between two SSLObjects; True when both finished."""
    done = [False, False]
    for _ in range(20):
        for i, (obj, _incoming, outgoing) in enumerate(sides):
            if not done[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            data = outgoing.read()
            if data:
                sides[1 - i][1].write(data)
        if all(done):
            return True
    return False


@functools.cache
def legacy_tls_unavailable() -> str | None:
    """Why this OpenSSL cannot run a TLS 1.0/1.1-only server (a reason for pytest.skip), or
    None when it can: checked with an in-memory handshake that must settle on TLS 1.1."""
    if not (ssl.HAS_TLSv1 and ssl.HAS_TLSv1_1):
        return f"{ssl.OPENSSL_VERSION} was built without TLS 1.0/1.1"
    try:
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        trustme.CA().issue_cert("localhost").configure_cert(server)
        limit_versions(server, LEGACY)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
        limit_versions(client, LEGACY)
        sides = []
        for ctx, server_side in ((client, False), (server, True)):
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            sides.append((ctx.wrap_bio(incoming, outgoing, server_side=server_side,
                                       server_hostname=None if server_side else "localhost"),
                          incoming, outgoing))
        if not _pump(sides):
            return f"{ssl.OPENSSL_VERSION} does not complete a TLS 1.1 handshake"
        version = sides[0][0].version()
    except (ssl.SSLError, ValueError) as exc:
        return f"{ssl.OPENSSL_VERSION} refuses TLS 1.0/1.1 even at security level 0: {exc}"
    if version not in ("TLSv1", "TLSv1.1"):
        return f"{ssl.OPENSSL_VERSION} negotiated {version}, not TLS 1.0/1.1"
    return None


__all__ = ["LEGACY", "MODERN", "legacy_tls_unavailable", "limit_versions"]
