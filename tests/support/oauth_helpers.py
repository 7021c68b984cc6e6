"""Helpers for the OAuth tests: config files, a key file, the CLI in-process."""

from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from relayd import cli, secrets
from relayd.config.load import load_config
from relayd.config.schema import Config, Smarthost
from tests.support.config_builder import ConfigBuilder


def write_key(tmp_path: Path) -> Path:
    key = tmp_path / "secret.key"
    key.write_bytes(secrets.generate_key() + b"\n")
    key.chmod(0o600)
    return key


def encrypt_with(key_file: Path, value: str) -> str:
    return secrets.encrypt(secrets.load_key(key_file), value)


def write_oauth_config(tmp_path: Path, oauth_yaml: str, *, username: str = "relay@example.com",
                       name: str = "m365", **overrides: Any) -> Path:
    """``tmp_path``/relayd.yaml (ConfigBuilder defaults) with one xoauth2 smarthost whose
    ``auth.oauth`` is ``oauth_yaml``, a YAML mapping written as the test reads best."""
    oauth = yaml.safe_load(textwrap.dedent(oauth_yaml))
    smarthost = {"name": name, "host": "127.0.0.1", "port": 2525, "tls": "none",
                 "auth": {"method": "xoauth2", "username": username, "oauth": oauth}}
    return ConfigBuilder(tmp_path).write([smarthost], **overrides)


def load(path: Path) -> Config:
    return load_config(path)


def smarthost(path: Path, name: str = "m365") -> Smarthost:
    return load_config(path).smarthost(name)


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(argv: list[str], stdin: str = "") -> CliResult:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv, io=cli.IO(out, err, io.StringIO(stdin)))
    return CliResult(code, out.getvalue(), err.getvalue())
