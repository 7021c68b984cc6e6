"""The config examples in docs/oauth.md and docs/secrets.md load with the real config loader."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from relayd import secrets
from relayd.config.load import parse_config
from relayd.config.schema import AuthMethod

DOCS = Path(__file__).resolve().parents[2] / "docs"
BLOCKS = [(doc, textwrap.dedent(b)) for doc in ("oauth.md", "secrets.md")
          for b in re.findall(r"```yaml\n(.*?)```", (DOCS / doc).read_text(), flags=re.S)]
# A bare ``oauth:`` fragment is checked inside a minimal xoauth2 smarthost.
WRAP = """smarthosts:
  - name: fragment
    host: smtp.example.com
    auth:
      method: xoauth2
      username: relay@example.com
%s"""
FULL = [(d, b) for d, b in BLOCKS if b.lstrip().startswith("smarthosts:")] + [
    (d, WRAP % textwrap.indent(b, " " * 6)) for d, b in BLOCKS if b.startswith("oauth:")]
BASE = """
hostname: relay.example.com
spool: {path: %(root)s/spool}
state_dir: %(root)s/state
secrets: {key_file: %(root)s/secret.key}
"""


def test_docs_have_examples_for_every_provider() -> None:
    text = "".join(b for _, b in FULL)
    for provider in ("azure", "google", "generic"):
        assert f"provider: {provider}" in text
    assert len(FULL) >= 7  # O365 app-only + delegated, Gmail x3, generic x2


@pytest.mark.parametrize("block", [b for _, b in FULL], ids=[f"{d}-{i}" for i, (d, _) in enumerate(FULL)])
def test_example_is_valid_config(block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "secret.key"
    key.write_bytes(secrets.generate_key())
    enc = secrets.encrypt(secrets.load_key(key), "not-a-real-secret")
    text = block.replace('"enc:gAAAAAB..."', f'"{enc}"').replace("/etc/relayd/", f"{tmp_path}/")
    for name in re.findall(rf"{re.escape(str(tmp_path))}/([\w.-]+)", text):
        (tmp_path / name).write_text("not-a-real-secret\n")
    for var in re.findall(r"_env: (\w+)", text):
        monkeypatch.setenv(var, "not-a-real-secret")
    cfg = parse_config(BASE % {"root": tmp_path} + text)
    assert not cfg.warnings
    for sh in cfg.smarthosts:
        if sh.auth.method is AuthMethod.XOAUTH2:
            assert sh.auth.oauth is not None and sh.auth.username
        else:
            assert sh.auth.password is not None and sh.auth.password.reveal() == "not-a-real-secret"
