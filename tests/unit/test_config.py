"""Config validation: every mistake is reported with its key path, and good files load."""

from __future__ import annotations

from pathlib import Path

import pytest

from relayd.cli import main
from relayd.config.load import parse_config
from relayd.config.schema import AuthMethod, TlsMode
from relayd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return [str(p) for p in info.value.problems]


MINIMAL = "smarthosts:\n  - {name: a, host: smtp.example.com}\n"


def test_minimal_config_gets_spec_defaults() -> None:
    cfg = parse_config(MINIMAL)
    sh = cfg.smarthosts[0]
    assert sh.tls is TlsMode.STARTTLS and sh.port == 587 and sh.verify_certificate
    assert sh.pipelining
    assert sh.auth.method is AuthMethod.NONE
    assert cfg.max_message_size == 25 * 1024 * 1024
    assert cfg.max_recipients == 100
    assert [str(h) for h in cfg.listen] == ["127.0.0.1:25", "[::1]:25"]
    assert cfg.spool.max_age == 4 * 86400
    assert cfg.spool.retry.initial == 60 and cfg.spool.retry.max_interval == 3600


@pytest.mark.parametrize(("tls", "port"), [("implicit", 465), ("none", 25), ("starttls", 587)])
def test_default_port_follows_tls_mode(tls: str, port: int) -> None:
    cfg = parse_config(f"smarthosts:\n  - {{host: h, tls: {tls}}}\n")
    assert cfg.smarthosts[0].port == port


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("smarthosts:\n  - {host: h, port: 70000}\n",
         "smarthosts[0].port: must be between 1 and 65535 (got 70000)"),
        ("smarthosts:\n  - {host: h, tls: ssl}\n",
         "smarthosts[0].tls: must be one of none | starttls | implicit (got 'ssl')"),
        ("smarthosts:\n  - {host: h, auth: {method: digest}}\n",
         "smarthosts[0].auth.method: must be one of auto | none | plain | login | cram-md5 | "
         "xoauth2 (got 'digest')"),
        ("smarthosts:\n  - {name: x}\n",
         "smarthosts[0].host: is required (or set outbox: DIR to write .eml files instead)"),
        (MINIMAL + "lisen: ['127.0.0.1:25']\n", "lisen: unknown key (did you mean 'listen'?)"),
        ("smarthosts:\n  - {host: h, prot: 25}\n", "smarthosts[0].prot: unknown key (did you mean 'port'?)"),
        ("smarthosts:\n  - {host: h, pipelining: sometimes}\n",
         "smarthosts[0].pipelining: must be true or false (got 'sometimes')"),
        (MINIMAL + "max_recipients: many\n", "max_recipients: must be a whole number (got 'many')"),
        (MINIMAL + "max_message_size: huge\n",
         "max_message_size: must be a size like 25MB, 512KB or a byte count (got 'huge')"),
        (MINIMAL + "spool: {max_age: forever}\n",
         "spool.max_age: must be a duration like 30s, 5m, 1h or 4d (got 'forever')"),
        (MINIMAL + "sender: {from: {address: not-an-address}}\n",
         "sender.from.address: is not a valid email address (got 'not-an-address')"),
        (MINIMAL + 'sender: {from: {address: a@b.example, name: "x\\r\\nBcc: victim@x"}}\n',
         "sender.from.name: must not contain CR, LF or NUL (header injection)"),
        (MINIMAL + 'headers: {add: {X-A: "v\\nBcc: x@y"}}\n',
         "headers.add.X-A: must not contain CR, LF or NUL (header injection)"),
        ("smarthosts:\n  - {host: h, auth: {method: plain, username: " + "u" * 256 + ", password: p}}\n",
         "smarthosts[0].auth.username: is too long (256 characters, at most 255)"),
        ("smarthosts:\n  - {host: h, auth: {method: plain, username: u, password: " + "p" * 256 + "}}\n",
         "smarthosts[0].auth.password: is too long (256 characters, at most 255)"),
        (MINIMAL + "sender: {from: {address: a@b.example, name: " + "n" * 256 + "}}\n",
         "sender.from.name: is too long (256 characters, at most 255)"),
        ("smarthosts:\n  - {host: h, auth: {method: plain, username: u}}\n",
         "smarthosts[0].auth.password: is required for method plain (or password_file / password_env)"),
        (MINIMAL + "listen: ['[::1]:99999']\n", "listen[0]: port must be between 1 and 65535 (got '99999')"),
        (MINIMAL + "allowed_clients: [nowhere]\n",
         "allowed_clients[0]: must be an IP address or network like 127.0.0.0/8 (got 'nowhere')"),
        ("smarthosts: []\n", "smarthosts: needs at least one smarthost (host or outbox)"),
        (MINIMAL + "limits: {rate: fast}\n", "limits.rate: must be a rate like 14/s, 600/m or 10000/h (got 'fast')"),
    ],
)
def test_each_mistake_is_named_by_its_path(snippet: str, expected: str) -> None:
    assert expected in problems(snippet)


def test_all_problems_reported_at_once() -> None:
    found = problems("smarthosts:\n  - {host: h, port: 0, tls: x}\n  - {name: y}\nbogus: 1\n")
    assert len(found) == 4


def test_sizes_and_durations_follow_spec_units() -> None:
    cfg = parse_config(MINIMAL + "max_message_size: 512KB\nspool: {max_age: 2h, retry: {initial: 30s, max_interval: 1d}}\n")
    assert cfg.max_message_size == 512 * 1024
    assert cfg.spool.max_age == 7200
    assert cfg.spool.retry.max_interval == 86400
    assert parse_config(MINIMAL + "max_message_size: 1MiB\n").max_message_size == 1024 * 1024
    assert parse_config(MINIMAL + "max_message_size: 1000\n").max_message_size == 1000


def test_localhost_hostname_is_a_warning_not_an_error() -> None:
    cfg = parse_config("hostname: localhost\n" + MINIMAL)
    assert any(w.startswith("hostname:") for w in cfg.warnings)


def test_plain_text_password_warns_and_never_shows_the_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file = tmp_path / "relayd.yaml"
    cfg_file.write_text("smarthosts:\n  - {host: h, auth: {method: plain, username: u, password: hunter2secret}}\n")
    assert main(["-c", str(cfg_file), "check-config"]) == 0
    out = capsys.readouterr().out
    assert "smarthosts[0].auth.password" in out and "plain text" in out
    assert "config OK" in out
    assert "hunter2secret" not in out


def test_check_config_exit_1_with_one_line_per_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file = tmp_path / "relayd.yaml"
    cfg_file.write_text("smarthosts:\n  - {host: h, port: 70000}\n")
    assert main(["-c", str(cfg_file), "check-config"]) == 1
    assert capsys.readouterr().out.strip() == "smarthosts[0].port: must be between 1 and 65535 (got 70000)"


def test_missing_file_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", str(tmp_path / "nope.yaml"), "check-config"]) == 1
    assert "cannot read" in capsys.readouterr().out


def test_yaml_syntax_error_names_the_line() -> None:
    assert any(p.startswith("invalid YAML at line 3") for p in problems("smarthosts:\n  - {host: h\n"))


def test_shipped_dev_config_is_valid() -> None:
    cfg = parse_config((ROOT / "etc/relayd.dev.yaml").read_text(), source=ROOT / "etc/relayd.dev.yaml")
    assert str(cfg.listen[0]) == "127.0.0.1:2525"
    assert cfg.smarthosts[0].outbox == ROOT / "etc/../var/outbox"
