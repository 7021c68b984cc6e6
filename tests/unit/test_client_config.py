"""``load_client_config``: the settings ``relayd sendmail`` reads are the daemon's own.

sendmail once had its own YAML reader with its own defaults, which drifted from the daemon's
(another fallback hostname, no validation of hostname or local_domain). Now both read these
keys with the same code; these tests hold them to the same values and the same problems.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from relayd.config.load import load_client_config, load_config
from relayd.config.schema import ClientConfig, Config
from relayd.errors import ConfigError

SMARTHOST = "smarthosts: [{name: a, host: smtp.example.com}]\n"


@pytest.mark.parametrize("text", [
    "",                                                       # every default
    "hostname: relay.example.com\n",                          # local_domain follows hostname
    "hostname: relay.example.com\nlocal_domain: example.com\n",
    "listen: ['0.0.0.0:2525', '[::]:2525', '127.0.0.1:0']\n",
    "spool: {path: var/spool, max_age: 2d, retry: {initial: 30s}}\n",   # relative to the file
    "spool: {path: ~/spool}\n",
])
def test_the_same_file_gives_the_same_values(tmp_path: Path, text: str) -> None:
    path = tmp_path / "relayd.yaml"
    path.write_text(SMARTHOST + text)
    full, client = load_config(path), load_client_config(path)
    for field in dataclasses.fields(ClientConfig):
        assert getattr(client, field.name) == getattr(full, field.name), field.name


def test_each_field_is_the_config_field_of_that_name() -> None:
    """Same names and types as in ``Config``, so a caller can hold either."""
    client = typing.get_type_hints(ClientConfig)
    full = typing.get_type_hints(Config)
    assert {name: full[name] for name in client} == client


def test_secrets_and_other_sections_are_not_read(tmp_path: Path) -> None:
    """sendmail runs as www-data or a crontab user: it cannot read relayd's password files
    or key file, and a mistake elsewhere (refused by check-config and by a reload, while the
    daemon keeps running on its last good settings) must not stop it handing mail over."""
    path = tmp_path / "relayd.yaml"
    path.write_text("hostname: relay.example.com\n"
                    "secrets: {key_file: /nonexistent/secret.key}\n"
                    "limits: {rate: fast}\n"
                    "smarthosts:\n"
                    "  - name: ses\n"
                    "    host: email-smtp.eu-west-1.amazonaws.com\n"
                    "    auth: {method: plain, username: AKIA, password_file: /nonexistent/pw}\n"
                    "unsubscribe: {secret: 'enc:gAAAAAB-not-decryptable'}\n")
    with pytest.raises(ConfigError):
        load_config(path)
    client = load_client_config(path)
    assert (client.hostname, client.local_domain) == ("relay.example.com", "relay.example.com")


@pytest.mark.parametrize("text", [
    "listen: ['127.0.0.1:99999']\n",
    "listen: 127.0.0.1:25\n",
    "hostname: 'not a host'\n",
    "local_domain: 'ex ample.com'\n",
    "spool: {path: /var/spool/relayd, retry: {initial: soon}}\n",
    "spool: {pth: /var/spool/relayd}\n",
    "spool: 5\n",
    "- a list, not a mapping\n",
    "listen: [unclosed\n",
])
def test_problems_in_its_keys_read_as_check_config_says_them(tmp_path: Path, text: str) -> None:
    path = tmp_path / "relayd.yaml"
    path.write_text(SMARTHOST + text if not text.startswith("-") else text)
    with pytest.raises(ConfigError) as full:
        load_config(path)
    with pytest.raises(ConfigError) as client:
        load_client_config(path)
    assert client.value.problems
    assert set(map(str, client.value.problems)) <= set(map(str, full.value.problems))


def test_an_unreadable_file_is_the_same_problem(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as full:
        load_config(missing)
    with pytest.raises(ConfigError) as client:
        load_client_config(missing)
    assert list(map(str, client.value.problems)) == list(map(str, full.value.problems))
