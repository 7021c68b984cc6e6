"""The byte-level MIME helpers: delimiters, preamble/epilogue, header fields."""

from __future__ import annotations

from relayd.policy import _mime


def _msg(body: bytes) -> bytes:
    return (b"From: a@example.com\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=BB\r\n\r\n" + body)


def test_line_that_only_starts_like_a_boundary_is_content() -> None:
    data = _msg(b"preamble\r\n--BB\r\nContent-Type: text/plain\r\n\r\n--BBnot-a-delimiter\r\n"
                b"--BB \r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n--BB--\r\nepilogue\r\n")
    leaves = list(_mime.walk(data))
    assert [(leaf.path, leaf.content_type) for leaf in leaves] == [("1", "text/plain"), ("2", "text/html")]
    assert data[leaves[0].start:leaves[0].end].endswith(b"--BBnot-a-delimiter")
    out, notes = _mime.decorate(data, "FOOT", "<i>FOOT</i>", lambda leaf: None)
    assert out.startswith(data[:data.index(b"--BB\r\n")])        # header + preamble kept
    assert out.endswith(b"--BB--\r\nepilogue\r\n")               # epilogue kept
    assert out.count(b"FOOT") == 2 and len(notes) == 2


def test_missing_close_delimiter_runs_to_the_end() -> None:
    data = _msg(b"--BB\r\nContent-Type: text/plain\r\n\r\nunterminated\r\n")
    assert [leaf.content_type for leaf in _mime.walk(data)] == ["text/plain"]
    assert b"FOOT" in _mime.decorate(data, "FOOT", None, lambda leaf: None)[0]


def test_header_values_cannot_inject_fields() -> None:
    field = _mime.make_field("X-Tag", "a\r\nBcc: victim@example.com\nX: y\x00")
    assert field.count(b"\r\n") == 1 and field.startswith(b"X-Tag: a Bcc:")
    long = _mime.make_field("List-Unsubscribe", ", ".join(f"<https://e.com/{i * 'x'}>" for i in range(20)))
    lines = long.split(b"\r\n")[:-1]
    assert all(len(line) <= 78 or b" " not in line.strip() for line in lines)
    assert all(line.startswith(b" ") for line in lines[1:])
    assert _mime.field_value(long).replace(" ", "") == ", ".join(
        f"<https://e.com/{i * 'x'}>" for i in range(20)).replace(" ", "")


def test_headers_edit_and_split_without_body() -> None:
    h = _mime.Headers.parse(b"Subject: one\r\n two\r\nX-A: 1\r\nx-a: 2\r\n")
    assert h.get("subject") == "one two"
    assert h.get_all("X-A") == ["1", "2"]
    assert h.remove("X-a").items() == [("Subject", "one two")]
    header, body = _mime.split_message(b"Subject: no body\r\n")
    assert (header, body) == (b"Subject: no body\r\n", b"")


def test_the_name_and_address_caches_hold_only_short_values() -> None:
    # A header field can be megabytes long: long ones are parsed every time, never kept.
    long_from = "App <app@example.com>, " + "x" * 100_000
    kept = _mime._short_first_address.cache_info().currsize
    assert _mime.first_address(long_from) == "app@example.com"
    assert _mime._short_first_address.cache_info().currsize == kept
    long_field = b"X-Long: " + b"y" * 10_000 + b"\r\n"
    kept = _mime._short_field_name.cache_info().currsize
    assert _mime.field_name(long_field) == "x-long"
    assert _mime._short_field_name.cache_info().currsize == kept
    # Short ones are answered from the cache the second time, with the same result.
    assert _mime.first_address("App <a@b.example>") == "a@b.example"
    hits = _mime._short_first_address.cache_info().hits
    assert _mime.first_address("App <a@b.example>") == "a@b.example"
    assert _mime._short_first_address.cache_info().hits == hits + 1
    assert _mime.field_name(b"Subject : x\r\n") == _mime.field_name(b"Subject : x\r\n") == "subject"


def test_walk_with_containers_yields_each_multipart_before_its_parts() -> None:
    inner = (b"Content-Type: multipart/alternative; boundary=AA\r\n\r\n--AA\r\nContent-Type: text/plain\r\n\r\n"
             b"t\r\n--AA\r\nContent-Type: text/html\r\n\r\n<p>h</p>\r\n--AA--\r\n")
    signed = (b"Content-Type: multipart/signed; boundary=SS\r\n\r\n--SS\r\nContent-Type: text/plain\r\n\r\n"
              b"s\r\n--SS\r\nContent-Type: application/pgp-signature\r\n\r\nsig\r\n--SS--\r\n")
    data = _msg(b"--BB\r\n" + inner + b"\r\n--BB\r\n" + signed + b"\r\n--BB--\r\n")
    nodes = list(_mime.walk(data, containers=True))
    assert [(n.path, n.content_type, n.container) for n in nodes] == [
        ("", "multipart/mixed", True), ("1", "multipart/alternative", True), ("1.1", "text/plain", False),
        ("1.2", "text/html", False), ("2", "multipart/signed", True)]
    assert (nodes[0].start, nodes[0].end) == (0, len(data))
    assert data[nodes[1].start:nodes[1].end] == inner
    assert data[nodes[4].start:nodes[4].end] == signed
    # Without the flag, only the leaves that may be decorated (signed content is opaque).
    assert [n.path for n in _mime.walk(data)] == ["1.1", "1.2"]
