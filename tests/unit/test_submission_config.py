"""The submission: and users_file keys: defaults (RFC 8314 ports) and path-named problems."""

from __future__ import annotations

import pytest

from relayd.config.load import parse_config
from relayd.config.schema import TlsMode
from relayd.errors import ConfigError

BASE = "smarthosts: [{name: a, host: smtp.example.com}]\n"


def _problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + text)
    return [str(p) for p in info.value.problems]


def test_without_submission_nothing_changes() -> None:
    cfg = parse_config(BASE)
    assert cfg.submission == () and cfg.users_file is None


def test_defaults_follow_rfc_8314() -> None:
    cfg = parse_config(BASE + "users_file: /etc/relayd/users.yaml\nsubmission:\n"
                       "  - {cert_file: /c.pem, key_file: /k.pem}\n"
                       "  - {tls: implicit, cert_file: /c.pem, key_file: /k.pem}\n")
    starttls, implicit = cfg.submission
    assert (starttls.tls, starttls.listen.port, implicit.tls, implicit.listen.port) == (
        TlsMode.STARTTLS, 587, TlsMode.IMPLICIT, 465)
    assert [str(n) for n in starttls.allowed_clients] == ["0.0.0.0/0", "::/0"]
    assert (starttls.auth_failure_delay, starttls.auth_failure_limit,
            starttls.auth_failure_window, starttls.auth_lockout) == (1.0, 5, 600.0, 900.0)


def test_no_clear_text_auth_on_any_address() -> None:
    problems = _problems("users_file: /u.yaml\nsubmission:\n"
                         "  - {listen: '0.0.0.0:587', tls: none, cert_file: /c, key_file: /k}\n")
    assert problems == ["submission[0].tls: must be starttls or implicit: a submission listener "
                        "takes passwords, which never travel in clear text (use listen: for "
                        "unauthenticated loopback mail)"]


def test_certificate_and_users_file_are_required() -> None:
    problems = _problems("submission: [{listen: '0.0.0.0:587'}]\n")
    assert "submission[0].cert_file: is required (the TLS certificate and its key, PEM)" in problems
    assert "submission[0].key_file: is required (the TLS certificate and its key, PEM)" in problems
    assert any(p.startswith("users_file: is required with submission") for p in problems)


def test_unknown_key_in_a_listener_is_named() -> None:
    problems = _problems("users_file: /u\nsubmission: [{cert_file: /c, key_file: /k, port: 1}]\n")
    assert problems and problems[0].startswith("submission[0].port:")
