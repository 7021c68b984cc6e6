"""The shared_state section: what it accepts, its defaults and the problems it names."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from relayd.config.load import parse_config
from relayd.config.schema import SslMode
from relayd.errors import ConfigError

BASE = {"hostname": "relay-a.example.com",
        "smarthosts": [{"name": "a", "host": "smtp.example.com"}]}


def _parse(shared: object, environ: dict[str, str] | None = None) -> object:
    return parse_config(yaml.safe_dump({**BASE, "shared_state": shared}), environ=environ)


def _problems(shared: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        _parse(shared)
    return [str(p) for p in info.value.problems]


def test_absent_means_no_shared_state() -> None:
    assert parse_config(yaml.safe_dump(BASE)).shared_state is None


def test_defaults_node_is_the_hostname_and_loopback_needs_no_tls() -> None:
    cfg = parse_config(yaml.safe_dump({**BASE, "shared_state": {
        "url": "postgresql://relayd@127.0.0.1:5432/relayd", "password_env": "PGPW"}}),
        environ={"PGPW": "s3cret"})
    st = cfg.shared_state
    assert st is not None
    assert (st.node, st.sslmode, st.ca_file) == ("relay-a.example.com", SslMode.DISABLE, None)
    assert st.password is not None and st.password.reveal() == "s3cret"
    assert "s3cret" not in repr(cfg)


def test_remote_database_defaults_to_verify_full(tmp_path: Path) -> None:
    pw = tmp_path / "pg.password"
    pw.write_text("s3cret\n")
    cfg = parse_config(yaml.safe_dump({**BASE, "shared_state": {
        "url": "postgresql://relayd@db.example.com/relayd", "password_file": str(pw),
        "ca_file": str(tmp_path / "ca.pem"), "node": "relay-b"}}))
    st = cfg.shared_state
    assert st is not None
    assert (st.sslmode, st.node, st.ca_file) == (SslMode.VERIFY_FULL, "relay-b", tmp_path / "ca.pem")
    assert st.password is not None and st.password.reveal() == "s3cret"


@pytest.mark.parametrize(("shared", "problem"), [
    ({}, "shared_state.url: is required (postgresql://USER@HOST:PORT/DBNAME)"),
    ({"url": "mysql://x@h/db"}, "shared_state.url: must be a postgresql://USER@HOST:PORT/DBNAME URL"),
    ({"url": "postgresql://relayd:hunter2@h/db"},
     "shared_state.url: must not hold the password: use shared_state.password_file, "
     "password_env or an enc: password"),
    ({"url": "postgresql://relayd@h"},
     "shared_state.url: must name the database (postgresql://USER@HOST:PORT/DBNAME)"),
    ({"url": "postgresql://relayd@h/db?sslmode=disable"},
     "shared_state.url: must not set sslmode or sslrootcert: use shared_state.sslmode and "
     "shared_state.ca_file"),
    ({"url": "postgresql://relayd@h/db", "sslmode": "prefer"},
     "shared_state.sslmode: must be one of disable | require | verify-ca | verify-full (got 'prefer')"),
    ({"url": "postgresql://relayd@h/db", "node": "relay a"},
     "shared_state.node: must be 1 to 63 letters, digits, '.', '_' or '-' (got 'relay a')"),
    ({"url": "postgresql://relayd@h/db", "password": "x", "password_env": "Y"},
     "shared_state.password: give only one of password, password_env"),
    ({"url": "postgresql://relayd@h/db", "passwd": "x"},
     "shared_state.passwd: unknown key (did you mean 'password'?)"),
])
def test_problems_name_the_key(shared: object, problem: str) -> None:
    assert problem in _problems(shared)


def test_password_never_appears_in_problems() -> None:
    problems = _problems({"url": "postgresql://relayd:hunter2@h/db"})
    assert not any("hunter2" in p for p in problems)
