"""``relayd secret keygen|encrypt`` and encrypted values in the config, via ``cli.main``."""

from __future__ import annotations

from pathlib import Path

from relayd.config import load_config
from tests.support.oauth_helpers import run_cli

SECRET = "smtp-password-s3cr3t"


def minimal_config(tmp_path: Path, password_line: str = "", key: str = "keys/secret.key") -> Path:
    cfg = tmp_path / "relayd.yaml"
    text = f"""\
hostname: relay.example.com
state_dir: {tmp_path / 'state'}
spool: {{path: {tmp_path / 'spool'}}}
secrets: {{key_file: {key}}}
smarthosts:
  - name: primary
    host: smtp.example.com
    auth:
      method: plain
      username: app@example.com
      {password_line}
"""
    cfg.write_text(text)
    return cfg


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
    assert again.code == 1
    assert "already exists" in again.err and "not overwriting" in again.err
    assert key.read_bytes() == content


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
