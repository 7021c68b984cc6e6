"""redact()'s quick pre-check never lets through anything the full patterns would redact."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.daemon import logsetup

PIECES = ["AUTH", "auth", "PLAIN", "LOGIN", "XOAUTH2", " ", "\t", "\n", "C:", ">>", ">>>", "->",
          "client:", "dXNlcjE2", "abc", "=", "password", "passwd", "Secret", "token",
          "access_token", "Authorization:", "Bearer", "?", "&", "code", '"', ":", "x9+/", "==",
          "assertion", "relay=", "to=<a@b>", "\u017f", "\u0131", "\u212a", "pa\u017f\u017fword=", "to\u212aen=",
          "assert\u0131on="]


def _all_patterns(text: str) -> str:
    for pattern, replacement in logsetup._PATTERNS:
        text = pattern.sub(replacement, text)
    return text


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=25).map("".join))
def test_redact_equals_applying_every_pattern(text: str) -> None:
    assert logsetup.redact(text) == _all_patterns(text)


def test_a_delivery_line_is_left_alone_and_secrets_are_not() -> None:
    line = ("0190ABCDEF12345: to=<bob@example.com>, relay=smtp.example.com[1.2.3.4]:587, "
            "delay=0.2, dsn=2.0.0, status=sent (250 2.0.0 Ok)")
    assert logsetup.redact(line) == line
    assert "hunter2" not in logsetup.redact("login failed: password=hunter2")
    assert "dXNlcg" not in logsetup.redact("C: AUTH PLAIN dXNlcgBwdw==")
