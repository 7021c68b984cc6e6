"""Pure pieces of the OAuth code: refresh timing, error classification, pasted codes, key rings."""

from __future__ import annotations

from pathlib import Path

import pytest

from relayd import secrets
from relayd.errors import OAuthError
from relayd.oauth.endpoint import classify_error
from relayd.oauth.google import _code_from
from relayd.oauth.store import _slug
from relayd.oauth.token import Token
from relayd.secrets import Secret


@pytest.mark.parametrize(("lifetime", "refresh_after"), [
    (3600, 3000),     # 10 minutes before expiry
    (86400, 85800),
    (600, 300),       # short-lived: half-way
    (60, 30),
])
def test_refresh_time(lifetime: float, refresh_after: float) -> None:
    token = Token(Secret("t"), expires_at=1000 + lifetime, issued_at=1000, account="a")
    assert token.refresh_at() == 1000 + refresh_after


def test_token_repr_hides_the_token() -> None:
    assert "secret-token" not in repr(Token(Secret("secret-token"), 1, 0, "a"))


@pytest.mark.parametrize(("code", "status", "permanent"), [
    ("invalid_grant", 400, True),
    ("invalid_client", 401, True),
    ("unauthorized_client", 400, True),
    ("invalid_scope", 400, True),
    ("temporarily_unavailable", 503, False),
    ("server_error", 500, False),
    ("", 502, False),
    ("", 429, False),
    ("", 401, True),
])
def test_classify_error(code: str, status: int, permanent: bool) -> None:
    err = classify_error("m365", code, "details\nmore", what="x", refresh_hint="re-auth", status=status)
    assert isinstance(err, OAuthError)
    assert err.permanent is permanent
    assert "\n" not in str(err)
    if code == "invalid_grant":
        assert err.hint == "re-auth"


def test_pasted_google_redirect() -> None:
    assert _code_from("http://127.0.0.1/?state=s1&code=4/0Ab&scope=x\n", "s1") == "4/0Ab"
    assert _code_from("  4/0Ab  ", "s1") == "4/0Ab"
    with pytest.raises(OAuthError, match="state mismatch"):
        _code_from("http://127.0.0.1/?state=zz&code=4/0Ab", "s1")
    with pytest.raises(OAuthError, match="access_denied"):
        _code_from("http://127.0.0.1/?error=access_denied&state=s1&code=", "s1")


def test_slug_keeps_names_apart() -> None:
    assert _slug("m365") == "m365"
    assert _slug("a/b") != _slug("a_b")
    assert "/" not in _slug("../etc/passwd")


def test_key_ring_first_key_encrypts_all_decrypt(tmp_path: Path) -> None:
    old, new = secrets.generate_key(), secrets.generate_key()
    key_file = tmp_path / "k"
    key_file.write_bytes(old + b"\n")
    value = secrets.encrypt(secrets.load_key(key_file), "pw")
    key_file.write_bytes(b"# rotated 2026-11\n" + new + b"\n" + old + b"\n")
    ring = secrets.load_key(key_file)
    assert secrets.decrypt(ring, value) == "pw"
    again = secrets.encrypt(ring, "pw")
    key_file.write_bytes(new)
    assert secrets.decrypt(secrets.load_key(key_file), again) == "pw"
    with pytest.raises(ValueError, match="wrong key file"):
        secrets.decrypt(secrets.load_key(key_file), value)
    key_file.write_bytes(b"\n# nothing\n")
    with pytest.raises(ValueError, match="not a valid relayd key"):
        secrets.load_key(key_file)
