"""The users room's pure parts: sender authorization, the users file format and hashes, and
the AUTH failure guard."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relayd.errors import ConfigError
from relayd.smtpd.guard import AuthGuard
from relayd.users import authorize
from relayd.users.store import User, UsersFile, check_password, hash_password, parse_users, write_users


@pytest.mark.parametrize(("allowed", "address", "owned"), [
    (("*",), "anyone@anywhere.example", True),
    (("@example.com",), "App@Example.COM", True),
    (("@example.com",), "app@sub.example.com", False),
    (("app@example.com",), "app@example.com", True),
    (("app@example.com",), "other@example.com", False),
    ((), "app@example.com", False),
    (("@example.com",), "no-at-sign", False),
])
def test_owns(allowed: tuple[str, ...], address: str, owned: bool) -> None:
    assert authorize.owns(allowed, address) is owned


def test_envelope_and_header_checks() -> None:
    allowed = ("@example.com",)
    assert authorize.check_envelope(allowed, "<>") is None  # bounces own nothing to forge
    assert authorize.check_envelope(allowed, "x@example.com") is None
    assert authorize.check_envelope(allowed, "x@evil.example") is not None
    ok = b"From: \"A, B\" <a@example.com>\r\nTo: x@y.z\r\n\r\nFrom: me@evil.example\r\n"
    assert authorize.check_header(allowed, ok) is None  # the body's "From:" is not a header
    two = b"From: a@example.com\r\nFrom: b@evil.example\r\n\r\n"
    assert "b@evil.example" in (authorize.check_header(allowed, two) or "")
    folded = b"From: A\r\n <a@evil.example>\r\n\r\n"
    assert authorize.check_header(allowed, folded) is not None
    assert authorize.check_header(allowed, b"From: nobody\r\n\r\n") is not None
    assert authorize.check_header(allowed, b"Subject: no from\r\n\r\n") is None


def test_hash_is_scrypt_salted_and_checked() -> None:
    # A password with characters base64 never has, so that finding it in the hash means it
    # is stored in clear (a short one like "pw" turns up in random base64 now and then).
    pw = "pw:with spaces!"
    h1, h2 = hash_password(pw), hash_password(pw)
    assert h1.startswith("$scrypt$ln=14,r=8,p=1$") and h1 != h2 and pw not in h1
    assert check_password(pw.encode(), h1) and not check_password(b"pW:with spaces!", h1)
    assert not check_password(pw.encode(), "not a hash")


def test_users_file_round_trip_and_verify(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    write_users(path, {"alice": User("alice", hash_password("pw"), ("@example.com",))})
    assert os.stat(path).st_mode & 0o777 == 0o640
    users = UsersFile(path)
    assert users.verify(b"alice", b"pw") is not None
    assert users.verify(b"alice", b"bad") is None
    assert users.verify(b"bob", b"pw") is None
    assert users.verify(b"\xff\x00", b"pw") is None
    text = path.read_text().replace("allowed_from:\n  - '@example.com'", "disabled: true\n  allowed_from: []")
    path.write_text(text)
    os.utime(path, ns=(1, 1))
    assert users.refresh()
    assert users.verify(b"alice", b"pw") is None  # disabled


def test_world_readable_users_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    write_users(path, {})
    path.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        UsersFile(path)
    assert str(info.value.problems[0]).startswith("users_file: is readable by every user")


def test_bad_users_file_names_the_entry() -> None:
    with pytest.raises(ConfigError) as info:
        parse_users("users:\n  - {name: alice, password_hash: x, rate: fast}\n")
    lines = [str(p) for p in info.value.problems]
    assert any(line.startswith("users_file: users[0].password_hash:") for line in lines)
    assert any(line.startswith("users_file: users[0].rate:") for line in lines)


def test_guard_locks_out_after_the_limit_within_the_window() -> None:
    g = AuthGuard(limit=3, window=60, lockout=100)
    assert g.failed("1.2.3.4", 0) == 2
    assert g.failed("1.2.3.4", 70) == 2  # the first one left the window
    assert g.failed("1.2.3.4", 71) == 1
    assert not g.locked("1.2.3.4", 71)
    assert g.failed("1.2.3.4", 72) == 0
    assert g.locked("1.2.3.4", 100) and not g.locked("5.6.7.8", 100)
    assert not g.locked("1.2.3.4", 173)
