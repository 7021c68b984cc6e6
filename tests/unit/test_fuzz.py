"""Short fuzzing runs (hypothesis) in CI over the four parsers that see untrusted input: the
SMTP DATA reader, the policy pipeline, the sendmail argument parser and the config loader.
The long run (>= 1 million inputs) is bench/fuzz.py; what was run is in docs/reliability.md.

Properties: no crash and no exception other than the documented one; for DATA, the stream is
cut exactly at the first CRLF "." CRLF whatever the TCP chunking, and stuffing then
unstuffing gives back the message; for the policy, every part's text survives.
"""

from __future__ import annotations

import asyncio
import contextlib
import types

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayd.commands.sendmail_args import Mode, UsageError, parse_args, read_message
from relayd.config.load import parse_config
from relayd.delivery.smtp.sevenbit import Unconvertible, to_7bit
from relayd.errors import ConfigError
from relayd.model import Envelope, Message
from relayd.policy.pipeline import build_policy, run_pipeline
from relayd.policy.records import PolicyContext
from relayd.smtpd.lines import CommandLineReader
from relayd.smtpd.listener import RelaySMTP
from tests.support.policy_helpers import config, corpus, eml

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- the SMTP DATA reader --------------------------------------------------------------------

# Tokens chosen to hit every end-of-data trick (smuggling variants, CR/LF mixes, dots, NULs).
TOKENS = [b"\r\n", b"\n", b"\r", b".", b"..", b"a", b"xyz", b"\x00", b"\xff", b".\r\n", b"\r\n.\r\n",
          b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n..\r\n", b" "]
CONTENT = st.lists(st.sampled_from(TOKENS), max_size=60).map(b"".join)


def stuff(content: bytes) -> bytes:
    """What an SMTP client sends after 354 (RFC 5321 §4.5.2): lines starting with "." get an
    extra one, then CRLF "." CRLF. The content is completed to end with CRLF first."""
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    return (b"\r\n" + content).replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n"


def unstuff(raw: bytes) -> bytes:
    """The listener's unstuffing (relayd.smtpd.listener.RelaySMTP.smtp_DATA)."""
    return (b"\r\n" + raw).replace(b"\r\n.", b"\r\n")[2:]


async def read_data(stream: bytes, cuts: list[int], limit: int, size_limit: int) -> tuple[bytes, bool, bytes]:
    """Feed ``stream`` in pieces to a CommandLineReader with buffer ``limit`` and run the real
    RelaySMTP._read_data on it; returns (raw, too_big, bytes left for the next command)."""
    reader = CommandLineReader(limit=limit)  # the reader the listener gets
    fake = types.SimpleNamespace(_reader=reader, data_size_limit=size_limit, _reset_timeout=lambda: None)

    async def feed() -> None:
        last = 0
        for cut in [*sorted(set(cuts)), len(stream)]:
            if cut > last:
                reader.feed_data(stream[last:cut])
                last = cut
            await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.create_task(feed())
    raw, too_big = await RelaySMTP._read_data(fake)  # type: ignore[arg-type]
    await feeder
    rest = await reader.read()
    return raw, too_big, rest


@FAST
@given(content=CONTENT, after=CONTENT, cuts=st.lists(st.integers(0, 400), max_size=12),
       limit=st.sampled_from([8, 16, 64, 65536]))
def test_data_reader_round_trip_under_any_chunking(content: bytes, after: bytes, cuts: list[int],
                                                   limit: int) -> None:
    wire = stuff(content)
    raw, too_big, rest = asyncio.run(read_data(wire + after, cuts, limit, 0))
    assert not too_big
    expected = content if content.endswith(b"\r\n") else content + b"\r\n"
    assert unstuff(raw) == expected
    assert rest == after  # nothing after the terminator was swallowed or taken as content


@FAST
@given(stream=CONTENT, cuts=st.lists(st.integers(0, 400), max_size=12), limit=st.sampled_from([8, 64, 65536]))
def test_data_reader_ends_exactly_at_the_first_crlf_dot_crlf(stream: bytes, cuts: list[int], limit: int) -> None:
    # The DATA command line ended with CRLF, so "." CRLF at the very start also terminates.
    stream += b"\r\n.\r\n"
    end = (b"\r\n" + stream).find(b"\r\n.\r\n")  # in the stream with the command's CRLF
    raw, _, rest = asyncio.run(read_data(stream, cuts, limit, 0))
    assert raw == stream[:end]  # the content keeps its last CRLF; the dot line is not content
    assert rest == stream[end + 3:]


@FAST
@given(content=CONTENT, size_limit=st.integers(1, 40), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_data_reader_oversize_drains_to_the_terminator(content: bytes, size_limit: int, cuts: list[int]) -> None:
    wire = stuff(content * 4)
    raw, too_big, rest = asyncio.run(read_data(wire + b"QUIT\r\n", cuts, 16, size_limit))
    if too_big:
        assert raw == b""
    assert rest == b"QUIT\r\n"  # the session stays in sync after a 552


# --- the policy pipeline ----------------------------------------------------------------------

POLICY = build_policy(config("""
sender: {from: {address: noreply@example.com, name: "Relay", mode: always}}
headers: {add: {X-Tag: fuzz}, remove: [X-Mailer]}
unsubscribe: {url: "https://example.com/u?t={token}", secret: fuzz-secret,
              footer_text: "Unsubscribe: {url}", footer_html: '<a href="{url}">Unsubscribe</a>'}
"""), {})
CTX = PolicyContext(now=1_800_000_000.0, suppressed=frozenset())
SEEDS = [eml(n) for n in corpus()]


def mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    """Byte-level damage: truncate, delete, duplicate, or overwrite spans (bad boundaries,
    cut headers, broken encodings)."""
    out = bytearray(data)
    for kind, pos, n in ops:
        if not out:
            break
        pos %= len(out)
        if kind == 0:
            del out[pos:]
        elif kind == 1:
            del out[pos:pos + n]
        elif kind == 2:
            out[pos:pos] = out[pos:pos + n]
        else:
            out[pos:pos + 1] = bytes([n % 256])
    return bytes(out)


def nested(depth: int) -> bytes:
    head = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
                    for i in range(depth))
    return b"Subject: deep\r\nMIME-Version: 1.0\r\n" + head + b"Content-Type: text/plain\r\n\r\nMARKER-DEEP\r\n"


@FAST
@given(seed=st.sampled_from(range(len(SEEDS))),
       ops=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10**6), st.integers(1, 300)), max_size=6))
def test_pipeline_survives_damaged_mime(seed: int, ops: list[tuple[int, int, int]]) -> None:
    content = mutate(SEEDS[seed], ops)
    result = run_pipeline(POLICY, Message(Envelope("app@example.com", ("a@example.net",)), content), CTX)
    for out in result.outputs:
        assert isinstance(out.content, bytes) and out.content
        assert b"\x00" not in out.content or b"\x00" in content


def test_pipeline_survives_deep_nesting_and_keeps_the_text() -> None:
    for depth in (5, 50, 500, 3000):
        content = nested(depth)
        result = run_pipeline(POLICY, Message(Envelope("a@example.com", ("b@example.net",)), content), CTX)
        out = result.outputs[0].content
        assert b"MARKER-DEEP" in out
        if depth <= 5:
            assert b"Unsubscribe: https://example.com/u?t=" in out  # decorated as usual
        else:
            body = content.split(b"\r\n\r\n", 1)[1]
            assert out.endswith(b"\r\n\r\n" + body)  # too deep to be real mail: body left alone



@FAST
@given(seed=st.sampled_from(range(len(SEEDS))),
       ops=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10**6), st.integers(1, 300)), max_size=6),
       eight=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0x80, 0xFF)), min_size=1, max_size=4))
def test_7bit_conversion_converts_or_refuses_damaged_mime(seed: int, ops: list[tuple[int, int, int]],
                                                        eight: list[tuple[int, int]]) -> None:
    # For a smarthost without 8BITMIME: a 7-bit result or Unconvertible, never another error
    # (which would leave the message deferred until spool.max_age) and never 8-bit bytes.
    content = bytearray(mutate(SEEDS[seed], ops) or b"x")
    for pos, byte in eight:
        content[pos % len(content)] = byte
    try:
        done = to_7bit(bytes(content))
    except Unconvertible as exc:
        assert str(exc)
        return
    assert done.content.isascii()


def test_7bit_conversion_of_deep_nesting_ends() -> None:
    for depth in (5, 50, 3000):
        content = nested(depth).replace(b"MARKER-DEEP", "MARKÉR".encode())
        try:
            assert to_7bit(content).content.isascii()
        except Unconvertible as exc:
            assert depth > 32 and "nested deeper than 32 levels" in str(exc)
    attached = b"Content-Type: message/rfc822\r\n\r\n" * 100 + "Subject: x\r\n\r\né\r\n".encode()
    with pytest.raises(Unconvertible, match="nests messages deeper than 32 levels"):
        to_7bit(b"MIME-Version: 1.0\r\n" + attached)

# --- sendmail ---------------------------------------------------------------------------------

ARG = st.one_of(st.sampled_from(["-t", "-i", "-oi", "-f", "-r", "-F", "-bs", "-bp", "-bm", "-bd", "-q",
                                 "-q30m", "-odi", "-oem", "--", "-", "-x", "-ti", "-fa@b", "-Fname",
                                 "a@example.com", "a@x, b@y", "<a@x>", "Name <a@x>", "-I"]),
                 st.text(alphabet=st.sampled_from(list("-ftiFrbo@<>,. a\r\n\x00é\"")), max_size=12))


@settings(max_examples=400, deadline=None)
@given(argv=st.lists(ARG, max_size=8), prog=st.sampled_from(["sendmail", "mailq", "newaliases"]))
def test_sendmail_argv_parses_or_is_a_usage_error(argv: list[str], prog: str) -> None:
    try:
        opts = parse_args(argv, prog=prog)
    except UsageError:
        return
    assert isinstance(opts.mode, Mode)
    for value in (opts.sender or "", opts.full_name or "", *opts.recipients):
        assert not any(c in value for c in "\r\n\x00")


class _Stream:
    def __init__(self, data: bytes) -> None:
        self.lines = data.splitlines(keepends=True)
        self.data = data

    def read(self, n: int = -1) -> bytes:
        data, self.data, self.lines = self.data, b"", []
        return data

    def readline(self) -> bytes:
        if not self.lines:
            return b""
        line = self.lines.pop(0)
        self.data = self.data[len(line):]
        return line

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        pass


@FAST
@given(data=CONTENT, ignore_dots=st.booleans())
def test_sendmail_message_reader_never_fails(data: bytes, ignore_dots: bool) -> None:
    out = read_message(_Stream(data), ignore_dots=ignore_dots)
    assert isinstance(out, bytes)
    if ignore_dots:
        assert out.replace(b"\r\n", b"\n") == data.replace(b"\r\n", b"\n") or len(out) <= len(data) + 2


# --- the config loader ---------------------------------------------------------------------------

SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**12), st.floats(allow_nan=True),
                   st.text(max_size=20), st.sampled_from(["25MB", "4d", "1h", "starttls", "127.0.0.1:25",
                                                          "enc:xyz", "[::1]:25", "0", "-1", "1e99"]))
KEYS = st.sampled_from(["hostname", "listen", "spool", "smarthosts", "sender", "headers", "priority",
                        "do_not_email", "unsubscribe", "limits", "alerts", "dkim", "metrics", "logging",
                        "name", "host", "port", "tls", "auth", "method", "oauth", "retry", "max_age",
                        "path", "add", "remove", "from", "address", "mode", "url", "secret", "rate",
                        "max_message_size", "allowed_clients", "outbox", "timeout", "x"])
TREE = st.recursive(SCALAR, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(KEYS, kids, max_size=5),
                    max_leaves=25)


@settings(max_examples=300, deadline=None)
@given(tree=st.dictionaries(KEYS, TREE, max_size=8))
def test_config_loader_raises_only_config_error_on_any_structure(tree: dict[str, object]) -> None:
    with contextlib.suppress(ConfigError):
        parse_config(yaml.safe_dump(tree), environ={})


@FAST
@given(text=st.text(max_size=300))
def test_config_loader_raises_only_config_error_on_any_text(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_config(text, environ={})


# --- regressions found by bench/fuzz.py (atheris) -------------------------------------------------

@pytest.mark.parametrize("snippet", [
    'spool: {path: "~no-such-user-relayd/spool"}',            # RuntimeError from expanduser
    'alerts: {webhook: "http://[broken"}',                      # ValueError: Invalid IPv6 URL
    'unsubscribe: {url: "https://[::1/u?t={token}", secret: s}',
    'smarthosts: [{name: o, host: smtp.example.com, auth: {method: xoauth2, username: u, '
    'oauth: {provider: generic, token_url: "https://[x", client_id: c, client_secret: s}}}]',
])
def test_config_values_that_used_to_raise_other_errors(snippet: str) -> None:
    with pytest.raises(ConfigError):
        parse_config("smarthosts: [{name: p, outbox: ./o}]\n" + snippet, environ={})


def test_pipeline_survives_a_nul_in_the_charset_parameter() -> None:
    content = (b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=\"utf\x00-8\"\r\n\r\n"
               b"MARKER-NUL-CHARSET\r\n")
    result = run_pipeline(POLICY, Message(Envelope("a@example.com", ("b@example.net",)), content), CTX)
    assert b"MARKER-NUL-CHARSET" in result.outputs[0].content
