"""The sendmail argv grammar and message fix-ups, driven by the argv real callers pass."""

from __future__ import annotations

import io
import types
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.commands.sendmail import format_mailq
from relayd.commands.sendmail_args import Mode, Options, UsageError, parse_args, prepare, read_message

# (caller, argv, expected options)
CALLERS = [
    ("PHP mail()", ["-t", "-i"], Options(extract=True, ignore_dots=True)),
    ("PHP mail() with 5th arg", ["-t", "-i", "-f", "www@example.com"],
     Options(extract=True, ignore_dots=True, sender="www@example.com")),
    ("PHP mail() glued -f", ["-t", "-i", "-fwww@example.com"],
     Options(extract=True, ignore_dots=True, sender="www@example.com")),
    ("cronie", ["-FCronDaemon", "-i", "-odi", "-oem", "-oi", "-t"],
     Options(extract=True, ignore_dots=True, full_name="CronDaemon")),
    ("cronie new", ["-FCronDaemon", "-i", "-odi", "-oem", "-oi", "-t", "-f", "root"],
     Options(extract=True, ignore_dots=True, full_name="CronDaemon", sender="root")),
    ("Debian cron", ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
     Options(ignore_dots=True, full_name="CronDaemon", recipients=("root",))),
    ("anacron", ["-FAnacron", "-odi", "root"],
     Options(full_name="Anacron", recipients=("root",))),
    ("atd", ["-i", "alice"], Options(ignore_dots=True, recipients=("alice",))),
    ("systemd-cron", ["-i", "-B", "8BITMIME", "user@x.example"],
     Options(ignore_dots=True, recipients=("user@x.example",))),
    ("mdadm", ["-t", "-fraid@example.org"], Options(extract=True, sender="raid@example.org")),
    ("s-nail", ["-i", "--", "bob@example.com"],
     Options(ignore_dots=True, recipients=("bob@example.com",))),
    ("s-nail dash recipient", ["-i", "--", "-weird@example.com"],
     Options(ignore_dots=True, recipients=("-weird@example.com",))),
    ("git send-email", ["-i", "-f", "dev@example.com", "a@example.com", "b@example.com"],
     Options(ignore_dots=True, sender="dev@example.com",
             recipients=("a@example.com", "b@example.com"))),
    ("SwiftMailer", ["-bs"], Options(mode=Mode.SMTP)),
    ("mailq", ["-bp"], Options(mode=Mode.LIST)),
    ("flush", ["-q"], Options(mode=Mode.FLUSH)),
    ("flush interval", ["-q30m"], Options(mode=Mode.FLUSH)),
    ("newaliases", ["-bi"], Options(mode=Mode.NOOP)),
    ("null sender", ["-f", "<>", "a@example.com"], Options(sender="", recipients=("a@example.com",))),
    ("-r alias of -f", ["-r", "<x@example.com>", "a@example.com"],
     Options(sender="x@example.com", recipients=("a@example.com",))),
    ("comma list", ["a@example.com, b@example.com"],
     Options(recipients=("a@example.com", "b@example.com"))),
    ("clustered -ti", ["-ti"], Options(extract=True, ignore_dots=True)),
    ("ignored legacy", ["-v", "-U", "-bm", "-N", "never", "-odb", "-Am", "-G", "-m", "-t"],
     Options(extract=True)),
    ("options after operands", ["root", "-i"], Options(ignore_dots=True, recipients=("root",))),
    ("FILTER_README re-injection", ["-G", "-i", "-f", "s@example.com", "--", "r@example.com"],
     Options(ignore_dots=True, sender="s@example.com", recipients=("r@example.com",))),
]


@pytest.mark.parametrize(("caller", "argv", "expected"), CALLERS, ids=[c[0] for c in CALLERS])
def test_real_caller_argv(caller: str, argv: list[str], expected: Options) -> None:
    assert parse_args(argv) == expected


def test_unknown_letter_is_a_warning_not_an_error() -> None:
    opts = parse_args(["-Z", "-t"])
    assert opts.extract
    assert opts.warnings == ("ignoring unknown option -Z",)


@pytest.mark.parametrize("argv", [["-bd"], ["-bt"], ["-bv", "x"], ["-f"], ["-bz"]])
def test_modes_that_cannot_be_honoured_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_args(argv)


def test_header_injection_through_argv_is_refused() -> None:
    with pytest.raises(UsageError):
        parse_args(["-F", "Evil\nBcc: victim@example.com", "-t"])
    with pytest.raises(UsageError):
        parse_args(["a@example.com\r\nRCPT TO:<b@example.com>"])


def test_argv0_mailq_and_newaliases() -> None:
    assert parse_args([], prog="mailq").mode is Mode.LIST
    assert parse_args([], prog="newaliases").mode is Mode.NOOP


def test_lone_dot_ends_input_without_i() -> None:
    data = b"Subject: x\n\nline\n.\nafter\n"
    assert read_message(io.BytesIO(data), ignore_dots=False) == b"Subject: x\n\nline\n"
    assert read_message(io.BytesIO(data), ignore_dots=True) == data


def test_t_extracts_to_cc_bcc_and_strips_bcc() -> None:
    raw = (b"From: App <app@example.com>\nTo: a@example.com,\n B <b@example.com>\n"
           b"Cc: c@example.com\nBcc: hidden@example.com\nSubject: hi\n\nbody\n")
    p = prepare(raw, Options(extract=True), login="www-data", local_domain="example.com",
                hostname="web.example.com")
    assert p.recipients == ("a@example.com", "b@example.com", "c@example.com",
                            "hidden@example.com")
    assert b"hidden" not in p.content
    assert b"Bcc" not in p.content
    assert p.content.endswith(b"\r\n\r\nbody\r\n")
    assert b"\n" not in p.content.replace(b"\r\n", b"")
    assert p.sender == "www-data@example.com"


def test_resent_headers_take_precedence() -> None:
    raw = b"To: orig@example.com\nResent-To: new@example.com\nResent-Bcc: rb@example.com\n\nx\n"
    p = prepare(raw, Options(extract=True), login="u", local_domain="d.example", hostname="h")
    assert p.recipients == ("new@example.com", "rb@example.com")
    assert b"rb@example.com" not in p.content


def test_bare_recipients_and_sender_are_qualified_and_from_date_msgid_added() -> None:
    raw = b"Subject: cron output\n\nhello\n"
    p = prepare(raw, Options(recipients=("root",), full_name="CronDaemon"), login="root",
                local_domain="example.com", hostname="host.example.com",
                now_header="Sat, 21 Nov 2026 10:00:00 +0000")
    assert p.recipients == ("root@example.com",)
    assert p.sender == "root@example.com"
    assert b"From: CronDaemon <root@example.com>\r\n" in p.content
    assert b"Date: Sat, 21 Nov 2026 10:00:00 +0000\r\n" in p.content
    assert b"Message-ID: <" in p.content and b"@host.example.com>" in p.content


def test_existing_from_is_kept_and_F_ignored() -> None:
    raw = b"From: Real <real@example.com>\nDate: x\nMessage-ID: <a@b>\nTo: a@example.com\n\nx"
    p = prepare(raw, Options(extract=True, full_name="CronDaemon"), login="u",
                local_domain="example.com", hostname="h")
    assert p.content.count(b"From:") == 1 and b"CronDaemon" not in p.content


def test_mbox_from_line_dropped_and_plain_text_becomes_body() -> None:
    p = prepare(b"From someone Sat Nov 21\nSubject: a\n\nb\n", Options(recipients=("x@y.example",)),
                login="u", local_domain="d", hostname="h")
    assert not p.content.startswith(b"From ")
    p = prepare(b"just some text\nmore\n", Options(recipients=("x@y.example",)), login="u",
                local_domain="d", hostname="h")
    assert p.content.endswith(b"\r\n\r\njust some text\r\nmore\r\n")


def test_no_recipients_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        prepare(b"Subject: x\n\n", Options(), login="u", local_domain="d", hostname="h")
    with pytest.raises(UsageError, match="no recipient"):
        prepare(b"Subject: x\n\n", Options(extract=True), login="u", local_domain="d", hostname="h")


def test_mailq_format_like_postfix() -> None:
    env = types.SimpleNamespace(mail_from="app@example.com", rcpt_tos=("a@example.com",))
    entries = [types.SimpleNamespace(id="4Xk2mN7QpRzbvT", state="queued", envelope=env, size=2048,
                                     created=datetime(2026, 11, 21, 10, 0, tzinfo=UTC).isoformat(),
                                     last_error="450 4.2.0 mailbox busy"),
               types.SimpleNamespace(id="4Xk2mN7QpRzbvV", state="held", envelope=env, size=10,
                                     created=1763719200.0, last_error=None)]
    text = format_mailq(entries)
    lines = text.splitlines()
    assert lines[0].startswith("-Queue ID-")
    assert lines[1].startswith("4Xk2mN7QpRzbvT ") and "app@example.com" in lines[1]
    assert "(450 4.2.0 mailbox busy)" in lines[2]
    assert lines[3].strip() == "a@example.com"
    assert "4Xk2mN7QpRzbvV!" in text
    assert lines[-1] == "-- 3 Kbytes in 2 Requests."
    assert format_mailq([]) == "Mail queue is empty\n"


_word = st.one_of(st.sampled_from(["-t", "-i", "-oi", "-f", "-F", "--", "-bs", "-bp", "-odi", "-oem",
                                   "-B", "-N", "-q", "-", "root", "a@b.example", "-fx@y"]),
                  st.text(max_size=12))


@given(st.lists(_word, max_size=8))
def test_parser_total_on_arbitrary_argv(argv: list[str]) -> None:
    """Whatever a caller passes, the parser answers Options or a usage error, and nothing
    it returns can smuggle a line break into headers or SMTP commands."""
    try:
        opts = parse_args(argv)
    except UsageError:
        return
    for value in (*opts.recipients, opts.sender or "", opts.full_name or ""):
        assert "\r" not in value and "\n" not in value


@given(st.binary(max_size=300), st.booleans())
def test_prepare_total_on_arbitrary_input(data: bytes, extract: bool) -> None:
    try:
        p = prepare(data, Options(extract=extract, recipients=("root",)), login="u",
                    local_domain="example.com", hostname="h.example.com")
    except UsageError:
        return
    assert b"\n" not in p.content.replace(b"\r\n", b"")
    assert p.recipients[0] == "root@example.com"
