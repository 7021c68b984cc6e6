"""DKIM through `relayd run` as a process: a message signed rsa-sha256 and ed25519-sha256 (two
fields) arrives upstream, and each signature verifies with dkimpy and with OpenDKIM's
``opendkim-testmsg`` (its own DNS in a private namespace: tests/support/opendkim.py);
check-config names a key that does not fit its algorithm."""

from __future__ import annotations

from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from relayd.policy.dkim import load_private_key, public_record
from tests.support import opendkim
from tests.support.operator import Operator, run_cli
from tests.support.policy_helpers import dkim_keypair
from tests.support.relay import upstream_smarthost, wait_until, write_config
from tests.support.upstream import FakeUpstream

MSG = (b"From: App <app@example.com>\r\nTo: user@example.net\r\nSubject: Your invoice\r\n"
       b"Date: Mon, 07 Dec 2026 10:00:00 +0000\r\nMessage-ID: <inv-1@example.com>\r\n"
       b"Content-Type: text/plain; charset=utf-8\r\n\r\nHello,\r\n\tyour  invoice.  \r\n\r\n")
# format=flowed (RFC 3676): a space at the end of most lines and runs of spaces, but no tab,
# which canonicalizes without the regex (relayd/policy/dkim.py).
FLOWED = (b"From: App <app@example.com>\r\nTo: user@example.net\r\nSubject: Flowed\r\n"
          b"Content-Type: text/plain; charset=utf-8; format=flowed\r\n\r\n"
          + b"".join(b"Line %d of a paragraph that  was soft-broken \r\n" % i for i in range(300))
          + b"The end.\r\n")


def _ed25519_pem() -> bytes:
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


def _only_signature(data: bytes, index: int) -> bytes:
    """``data`` with every DKIM-Signature field but the ``index``-th removed."""
    header, _, body = data.partition(b"\r\n\r\n")
    fields: list[bytes] = []
    for line in header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    sigs = [i for i, f in enumerate(fields) if f.lower().startswith(b"dkim-signature:")]
    keep = [f for i, f in enumerate(fields) if i not in sigs or i == sigs[index]]
    return b"\r\n".join(keep) + b"\r\n\r\n" + body


async def test_dual_signed_mail_verifies_with_dkimpy_and_opendkim(tmp_path: Path) -> None:
    assert opendkim.available() is None, opendkim.available()
    rsa_pem, ed_pem = dkim_keypair()[0], _ed25519_pem()
    (tmp_path / "rsa.pem").write_bytes(rsa_pem)
    (tmp_path / "ed.pem").write_bytes(ed_pem)
    records = {
        "rsa._domainkey.example.com": public_record(load_private_key(rsa_pem, "rsa-sha256")),
        "ed._domainkey.example.com": public_record(load_private_key(ed_pem, "ed25519-sha256")),
    }
    async with FakeUpstream() as up:
        op = Operator(tmp_path, [upstream_smarthost(up, tls="none")],
                      headers={"add": {"X-Extra": "1"}},
                      dkim=[{"domain": "example.com", "selector": "rsa",
                             "private_key_file": str(tmp_path / "rsa.pem")},
                            {"domain": "example.com", "selector": "ed",
                             "private_key_file": str(tmp_path / "ed.pem"),
                             "algorithm": "ed25519-sha256"}])
        await op.start()
        try:
            await op.send(MSG)
            await op.send(FLOWED)
            await wait_until(lambda: len(up.messages) == 2, what="delivery")
        finally:
            assert await op.stop() == 0
    assert b"PRIVATE KEY" not in op.log().encode()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return records[name.decode().rstrip(".")].encode()

    for message in up.messages:
        data = message.data
        word = b"your  invoice" if b"Subject: Your invoice" in data else b"Line 7 "  # to tamper
        assert data.count(b"DKIM-Signature:") == 2
        for i, algorithm in enumerate(("rsa-sha256", "ed25519-sha256")):
            assert dkim.DKIM(data).verify(idx=i, dnsfunc=dnsfunc), algorithm
            single = _only_signature(data, i)
            assert f"a={algorithm}".encode() in single
            assert opendkim.verify(single, records) == (0, ""), algorithm
            tampered = single.replace(word, word + b"s")
            rc, err = opendkim.verify(tampered, records)
            assert rc != 0 and "Bad signature" in err, (algorithm, err)


def test_check_config_names_a_key_that_does_not_fit_its_algorithm(tmp_path: Path) -> None:
    (tmp_path / "rsa.pem").write_bytes(dkim_keypair()[0])
    (tmp_path / "ed.pem").write_bytes(_ed25519_pem())
    cfg = write_config(tmp_path, [{"name": "a", "host": "smtp.example.com"}],
                       dkim=[{"domain": "example.com", "selector": "ed",
                              "private_key_file": str(tmp_path / "rsa.pem"),
                              "algorithm": "ed25519-sha256"},
                             {"domain": "example.com", "selector": "rsa",
                              "private_key_file": str(tmp_path / "ed.pem")}])
    result = run_cli(cfg, "check-config")
    assert result.code == 1
    lines = result.out.splitlines()
    assert lines[0].startswith("dkim[0].private_key_file: is not an Ed25519 private key"), lines
    assert lines[1].startswith("dkim[1].private_key_file: is not an RSA private key"), lines
    assert "PRIVATE KEY" not in result.out + result.err

    good = write_config(tmp_path, [{"name": "a", "host": "smtp.example.com"}],
                        dkim=[{"domain": "example.com", "selector": "s", "algorithm": "rsa-sha512",
                               "private_key_file": str(tmp_path / "rsa.pem")}])
    result = run_cli(good, "check-config")
    assert result.code == 1 and result.out.startswith("dkim[0].algorithm: "), result.out
