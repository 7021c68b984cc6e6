"""``relayd secret keygen|encrypt`` and encrypted values in the config, via ``cli.main``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from relayd import secrets as sec
from relayd.config.load import load_config
from tests.support.config_builder import ConfigBuilder
from tests.support.oauth_helpers import run_cli

SECRET = "smtp-password-s3cr3t"
ROOT = Path(__file__).resolve().parents[2]


def relayd(*argv: str) -> subprocess.CompletedProcess[str]:
    """``relayd ARGV`` as a sysadmin or a deploy script runs it: a separate process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "relayd", *argv], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=60)


def minimal_config(tmp_path: Path, password_line: str = "", key: str = "keys/secret.key") -> Path:
    """One smarthost with AUTH PLAIN; ``password_line`` is its ``password*:`` setting in YAML."""
    auth = {"method": "plain", "username": "app@example.com", **(yaml.safe_load(password_line) or {})}
    return ConfigBuilder(tmp_path).write([{"name": "primary", "host": "smtp.example.com", "auth": auth}],
                                         hostname="relay.example.com", secrets={"key_file": key})


def test_keygen_creates_0600_key_relative_to_config_and_refuses_overwrite(tmp_path: Path) -> None:
    # The password is already an enc: value that cannot be decrypted yet: keygen must not care.
    cfg = minimal_config(tmp_path, 'password: "enc:gAAAAABnot-yet-decryptable"')
    first = run_cli(["-c", str(cfg), "secret", "keygen"])
    assert first.code == 0, first.err
    key = tmp_path / "keys" / "secret.key"
    assert key.stat().st_mode & 0o777 == 0o600
    content = key.read_bytes()
    assert str(key) in first.out and content.strip().decode() not in first.out
    again = run_cli(["-c", str(cfg), "secret", "keygen"])
    # SPEC: an existing key file is left untouched and keygen exits 0 (it was exit 1 before).
    assert again.code == 0, again.err
    assert "already exists" in again.out and "left as it is" in again.out
    assert key.read_bytes() == content and key.stat().st_mode & 0o777 == 0o600
    assert content.strip().decode() not in again.out + again.err


def test_encrypt_round_trip_into_a_loadable_config(tmp_path: Path) -> None:
    cfg = minimal_config(tmp_path)
    assert run_cli(["-c", str(cfg), "secret", "keygen"]).code == 0
    enc = run_cli(["-c", str(cfg), "secret", "encrypt"], stdin=SECRET + "\n")
    assert enc.code == 0
    value = enc.out.strip()
    assert value.startswith("enc:") and SECRET not in value
    cfg = minimal_config(tmp_path, f'password: "{value}"')
    loaded = load_config(cfg)
    password = loaded.smarthosts[0].auth.password
    assert password is not None and password.reveal() == SECRET   # one trailing newline dropped
    check = run_cli(["-c", str(cfg), "check-config"])
    assert check.code == 0 and "config OK" in check.out
    assert SECRET not in check.out + check.err


def test_tampered_value_names_the_key(tmp_path: Path) -> None:
    cfg = minimal_config(tmp_path)
    run_cli(["-c", str(cfg), "secret", "keygen"])
    value = run_cli(["-c", str(cfg), "secret", "encrypt"], stdin=SECRET).out.strip()
    tampered = value[:-6] + ("A" if value[-6] != "A" else "B") + value[-5:]
    cfg = minimal_config(tmp_path, f'password: "{tampered}"')
    check = run_cli(["-c", str(cfg), "check-config"])
    assert check.code == 1
    assert check.out.startswith("smarthosts[0].auth.password: ")
    assert "wrong key file or the value was altered" in check.out


def test_wrong_key_file_names_the_key(tmp_path: Path) -> None:
    cfg = minimal_config(tmp_path)
    run_cli(["-c", str(cfg), "secret", "keygen"])
    value = run_cli(["-c", str(cfg), "secret", "encrypt"], stdin=SECRET).out.strip()
    (tmp_path / "keys" / "secret.key").unlink()
    run_cli(["-c", str(cfg), "secret", "keygen"])          # a different key now
    check = run_cli(["-c", str(minimal_config(tmp_path, f'password: "{value}"')), "check-config"])
    assert check.code == 1
    assert "smarthosts[0].auth.password:" in check.out


def test_plain_text_secret_warns(tmp_path: Path) -> None:
    check = run_cli(["-c", str(minimal_config(tmp_path, f"password: {SECRET}")), "check-config"])
    assert check.code == 0
    assert "warning: smarthosts[0].auth.password: is stored in plain text" in check.out
    assert SECRET not in check.out


def test_encrypt_without_key_explains(tmp_path: Path) -> None:
    result = run_cli(["-c", str(minimal_config(tmp_path)), "secret", "encrypt"], stdin=SECRET)
    assert result.code == 1
    assert "relayd secret keygen" in result.err
    assert SECRET not in result.out + result.err


def test_key_rotation_with_two_keys(tmp_path: Path) -> None:
    cfg = minimal_config(tmp_path)
    run_cli(["-c", str(cfg), "secret", "keygen"])
    old_value = run_cli(["-c", str(cfg), "secret", "encrypt"], stdin=SECRET).out.strip()
    # Documented rotation: make a new key, put it first, keep the old one below it.
    (tmp_path / "new").mkdir()
    new_cfg = minimal_config(tmp_path / "new", key="new.key")
    assert run_cli(["-c", str(new_cfg), "secret", "keygen"]).code == 0
    key = tmp_path / "keys" / "secret.key"
    key.write_bytes((tmp_path / "new" / "new.key").read_bytes() + key.read_bytes())
    # Old values still load; re-encrypting an enc: value gives one under the new key.
    assert load_config(minimal_config(tmp_path, f'password: "{old_value}"')).smarthosts[0].auth.password.reveal() == SECRET  # type: ignore[union-attr]
    new_value = run_cli(["-c", str(cfg), "secret", "encrypt"], stdin=old_value).out.strip()
    assert new_value.startswith("enc:") and new_value != old_value
    key.write_bytes((tmp_path / "new" / "new.key").read_bytes())       # retire the old key
    loaded = load_config(minimal_config(tmp_path, f'password: "{new_value}"'))
    assert loaded.smarthosts[0].auth.password.reveal() == SECRET  # type: ignore[union-attr]
    check = run_cli(["-c", str(minimal_config(tmp_path, f'password: "{old_value}"')), "check-config"])
    assert check.code == 1


def test_keygen_needs_the_config_file(tmp_path: Path) -> None:
    result = run_cli(["-c", str(tmp_path / "missing.yaml"), "secret", "keygen"])
    assert result.code == 1
    assert "cannot read" in result.err and "missing.yaml" in result.err
    assert list(tmp_path.iterdir()) == []


def _fingerprint(path: Path) -> tuple[bytes, int, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_mode, st.st_mtime_ns, st.st_ino


def test_keygen_on_every_deploy_leaves_the_key_untouched(tmp_path: Path) -> None:
    """Configuration management runs keygen on each deploy: the first run creates the key,
    every later one exits 0 and changes nothing, even the mode the admin chose."""
    cfg = minimal_config(tmp_path)
    first = relayd("-c", str(cfg), "secret", "keygen")
    assert first.returncode == 0, first.stderr
    key = tmp_path / "keys" / "secret.key"
    key.chmod(0o640)          # docs/secrets.md: chgrp relayd + 0640 for the daemon's user
    before = _fingerprint(key)
    for _ in range(2):
        again = relayd("-c", str(cfg), "secret", "keygen")
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip() == f"{key} already exists and holds a valid key; left as it is"
        assert again.stderr == ""
        assert _fingerprint(key) == before
    secret_key = before[0].strip().decode()
    assert secret_key not in first.stdout + first.stderr + again.stdout + again.stderr


def test_keygen_accepts_a_rotated_key_file(tmp_path: Path) -> None:
    """A key file with a comment and two keys (rotation, docs/secrets.md) is a valid key."""
    cfg = minimal_config(tmp_path)
    key = tmp_path / "keys" / "secret.key"
    key.parent.mkdir()
    key.write_bytes(b"# new key first\n" + sec.generate_key() + b"\n" + sec.generate_key() + b"\n")
    before = _fingerprint(key)
    result = relayd("-c", str(cfg), "secret", "keygen")
    assert result.returncode == 0, result.stderr
    assert "left as it is" in result.stdout
    assert _fingerprint(key) == before


@pytest.mark.parametrize("content", [b"", b"not a key\n", b"# only a comment\n",
                                     b"c2hvcnQ=\n", "n\u00e4h\n".encode()])
def test_keygen_with_an_invalid_key_file_exits_1_and_leaves_it(tmp_path: Path, content: bytes) -> None:
    """A file that is not a relayd key stays as it is, but the deploy must notice: exit 1
    and a message naming the file (never its content)."""
    cfg = minimal_config(tmp_path)
    key = tmp_path / "keys" / "secret.key"
    key.parent.mkdir()
    key.write_bytes(content)
    key.chmod(0o644)
    before = _fingerprint(key)
    result = relayd("-c", str(cfg), "secret", "keygen")
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"{key} exists but is not a valid relayd key; left as it is" in result.stderr
    assert "Traceback" not in result.stderr
    if content.strip():
        assert content.strip().decode() not in result.stderr
    assert _fingerprint(key) == before
    assert sorted(p.name for p in key.parent.iterdir()) == ["secret.key"]


def test_keygen_with_a_directory_in_the_keys_place_exits_1(tmp_path: Path) -> None:
    cfg = minimal_config(tmp_path)
    key = tmp_path / "keys" / "secret.key"
    key.mkdir(parents=True)
    result = relayd("-c", str(cfg), "secret", "keygen")
    assert result.returncode == 1
    assert f"{key} exists but cannot be read" in result.stderr and "left as it is" in result.stderr
    assert key.is_dir() and list(key.iterdir()) == []
