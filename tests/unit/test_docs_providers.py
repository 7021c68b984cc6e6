"""Every YAML block in docs/providers.md is a valid relayd config fragment: the recipes an
operator copies are checked by the same loader the daemon uses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relayd.config.load import parse_config
from relayd.config.schema import AuthMethod, TlsMode

DOC = Path(__file__).resolve().parents[2] / "docs" / "providers.md"
BLOCKS = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)
BASE = """
hostname: relay.example.com
listen: ["127.0.0.1:2525"]
spool: {path: %(root)s/spool}
state_dir: %(root)s/state
secrets: {key_file: %(root)s/secret.key}
"""
PROVIDERS = ["ses", "sendgrid", "mailgun", "postmark", "resend", "mailersend", "brevo", "m365",
             "m365", "gmail", "google", "google", "acs"]


def test_every_provider_has_a_block() -> None:
    names = [re.search(r"- name: (\S+)", b).group(1) for b in BLOCKS]  # type: ignore[union-attr]
    assert names == PROVIDERS


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{i}-{p}" for i, p in enumerate(PROVIDERS)])
def test_block_is_valid_config(block: str, tmp_path: Path) -> None:
    # Secret files named in the recipe must exist for the loader; put them under tmp_path.
    text = block.replace("/etc/relayd/", f"{tmp_path}/").replace("/var/lib/relayd/", f"{tmp_path}/")
    for name in re.findall(rf"{re.escape(str(tmp_path))}/([\w.-]+)", text):
        (tmp_path / name).write_text("not-a-real-secret\n")
    cfg = parse_config(BASE % {"root": tmp_path} + text)
    (sh,) = cfg.smarthosts
    assert sh.host and sh.tls in (TlsMode.STARTTLS, TlsMode.IMPLICIT)
    assert sh.port in (465, 587)
    assert sh.auth.method is not AuthMethod.NONE
    if sh.auth.method is AuthMethod.XOAUTH2:
        assert sh.auth.oauth is not None
    else:
        assert sh.auth.password is not None and sh.auth.password.reveal() == "not-a-real-secret"
    assert not cfg.warnings  # no plain-text secrets in the recipes
