"""relayd/_scan.c and its Python twins in relayd/bytescan.py give the same results, and
both match the definitions (the listener's tests hold the chosen functions to them too)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd import _scan, bytescan

TOKENS = [b"a", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b"\n.\r\n", b"\r\n.\r\n",
          b"..\r\n", b"text.\r\n", b"\n\n", b"\r\r"]
DATA = st.lists(st.sampled_from(TOKENS), max_size=40).map(b"".join)


def test_make_test_runs_the_c_module() -> None:
    # `pip install -e .` builds it; without a compiler it is skipped silently and relayd
    # runs the Python twins, so the tests say so rather than test only one side.
    assert bytescan.NATIVE
    assert bytescan.stuff is _scan.stuff


@settings(max_examples=1000, deadline=None)
@given(DATA, st.sampled_from([b".\r\n", b".", b"", b"\r\n"]), st.integers(0, 50))
def test_find_line_is_find_of_lf_and_rest(data: bytes, rest: bytes, start: int) -> None:
    expected = data.find(b"\n" + rest, start)
    assert _scan.find_line(data, rest, start) == expected
    assert _scan.find_line(bytearray(data), rest, start) == expected
    assert bytescan.py_find_line(data, rest, start) == expected


def test_find_line_refuses_a_negative_start() -> None:
    with pytest.raises(ValueError, match="start"):
        _scan.find_line(b"a\n.", b".", -1)


@settings(max_examples=1000, deadline=None)
@given(DATA)
def test_line_ends_ok_means_every_cr_and_lf_is_in_a_crlf(data: bytes) -> None:
    expected = re.sub(rb"\r\n", b"", data).translate(None, b"\r\n") == re.sub(rb"\r\n", b"", data)
    assert _scan.line_ends_ok(data) is expected
    assert bytescan.py_line_ends_ok(data) is expected


def _has_long_line(data: bytes, limit: int) -> bool:
    """The definition: a line is what lies between LFs, without the CR of a CRLF."""
    lines = data.split(b"\n")
    return any(len(line.removesuffix(b"\r") if i < len(lines) - 1 else line) > limit
               for i, line in enumerate(lines))


@settings(max_examples=1000, deadline=None)
@given(DATA, st.integers(0, 6))
def test_has_long_line_twins_agree_with_the_definition(data: bytes, limit: int) -> None:
    expected = _has_long_line(data, limit)
    assert _scan.has_long_line(data, limit) is expected
    assert bytescan.py_has_long_line(data, limit) is expected


LONGISH = st.lists(st.tuples(st.integers(990, 1002), st.sampled_from([b"\r\n", b"\n", b"\r", b""])),
                   max_size=4).map(lambda ls: b"".join(b"x" * n + end for n, end in ls))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(LONGISH, DATA), max_size=4).map(b"".join))
def test_has_long_line_at_998_octets(data: bytes) -> None:
    expected = _has_long_line(data, 998)
    assert _scan.has_long_line(data, 998) is expected
    assert bytescan.py_has_long_line(data, 998) is expected


def test_has_long_line_edges() -> None:
    for scan in (_scan.has_long_line, bytescan.py_has_long_line):
        assert not scan(b"x" * 998 + b"\r\n" + b"y" * 998, 998)
        assert scan(b"x" * 999 + b"\r\n", 998) and scan(b"x" * 998 + b"\r", 998)
        assert scan(b"x" * 998 + b"\r" + b"x", 998) and not scan(b"", 0)
        assert scan(b"a\r\n" * 10 + b"b" * 100_000 + b"\r\n", 998)
        with pytest.raises(ValueError, match="limit"):
            scan(b"x", -1)


@settings(max_examples=1000, deadline=None)
@given(DATA)
def test_stuff_and_unstuff_twins_agree(data: bytes) -> None:
    stuffed = (b"\r\n" + data).replace(b"\r\n.", b"\r\n..")[2:]
    unstuffed = (b"\r\n" + data).replace(b"\r\n.", b"\r\n")[2:]
    assert _scan.stuff(data) == bytescan.py_stuff(data) == stuffed
    assert _scan.unstuff(data) == bytescan.py_unstuff(data) == unstuffed
    assert _scan.unstuff(_scan.stuff(data)) == data


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=4), st.integers(0, 310))
def test_any_bytes(data: bytes, rest: bytes, start: int) -> None:
    # Arbitrary content, not only the tokens above. (test_scan_sanitizers.py runs random
    # cases on an ASan + UBSan build, for reads and writes outside the buffers.)
    assert _scan.find_line(data, rest, start) == data.find(b"\n" + rest, start)
    assert _scan.line_ends_ok(data) is bytescan.py_line_ends_ok(data)
    for limit in (0, 1, 3, 998):
        assert _scan.has_long_line(data, limit) is bytescan.py_has_long_line(data, limit) \
            is _has_long_line(data, limit)
    assert _scan.stuff(data) == bytescan.py_stuff(data)
    assert _scan.unstuff(data) == bytescan.py_unstuff(data)


def test_nothing_to_change_returns_the_same_object() -> None:
    body = b"Subject: x\r\n\r\nno dotted line here.\r\n" * 100
    assert _scan.stuff(body) is body and _scan.unstuff(body) is body


def test_a_large_message() -> None:
    line = b"The quick brown fox jumps over the lazy dog and keeps on running far away.\r\n"
    body = line * 1400 + b".dotted\r\n" + line * 10
    assert _scan.find_line(body, b".\r\n", 0) == -1
    assert _scan.find_line(body + b".\r\n", b".\r\n", 0) == len(body) - 1
    assert _scan.stuff(body) == bytescan.py_stuff(body)
    assert _scan.line_ends_ok(body) and not _scan.line_ends_ok(body + b"\n")


def test_only_bytes_are_stuffed() -> None:
    with pytest.raises(TypeError, match="bytes"):
        _scan.stuff(bytearray(b".a"))  # type: ignore[arg-type]
