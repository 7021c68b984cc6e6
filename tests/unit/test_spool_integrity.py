"""T13: a spool file whose content changed on disk (same length, other bytes) or whose header
has a format version this relayd does not know is set aside in corrupt/ wherever it is read,
never delivered nor deleted; files of earlier versions (no length, no CRC-32) still load."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import pytest

from relayd.model import Envelope, Message, State
from relayd.spool import store
from relayd.spool.importing import import_spool
from relayd.spool.records import FORMAT_VERSION, MAGIC, check_content, check_header, parse_file
from relayd.spool.store import Spool

CONTENT = b"Subject: invoice\r\n\r\nPay 100 EUR to account 12345\r\n"


def msg(content: bytes = CONTENT) -> Message:
    env = Envelope("alice@example.com", ("bob@example.com",), client="127.0.0.1", helo="app",
                   received_at=1000.0)
    return Message(env, content)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool", fsync=False)
    s.ensure_dirs()
    return s


def fresh(spool: Spool) -> Spool:
    """Another Spool on the same directory: nothing in memory, every read from the file (as
    in the delivery process, or after a restart)."""
    return Spool(spool.path, fsync=False)


def split(data: bytes) -> tuple[dict[str, object], bytes]:
    end = data.index(b"\n")
    n = int(data[len(MAGIC):end])
    return json.loads(data[end + 1:end + 1 + n]), data[end + n + 2:]


def write_file(path: Path, header: dict[str, object], content: bytes) -> None:
    head = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(b"".join((MAGIC, str(len(head)).encode(), b"\n", head, b"\n", content)))


def flip_a_content_byte(path: Path) -> None:
    """One byte of the content changed, the length kept (bit rot, a bad disk, an edit)."""
    data = bytearray(path.read_bytes())
    at = data.rindex(b"12345")
    data[at] ^= 0x01  # "1" -> "0"
    path.write_bytes(bytes(data))


def set_version(path: Path, version: object) -> None:
    header, content = split(path.read_bytes())
    write_file(path, {**header, "version": version}, content)


def test_a_flipped_content_byte_is_set_aside_at_claim_and_the_others_delivered(
        spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    bad, good = spool.put(msg()), spool.put(msg(CONTENT + b"second\r\n"))
    path = spool.path / "queued" / f"{bad}.msg"
    size = path.stat().st_size
    flip_a_content_byte(path)
    assert path.stat().st_size == size
    reader = fresh(spool)
    # The header alone is intact: the message is scheduled and listed like any other ...
    assert [row[0] for row in reader.schedule_rows([bad, good])] == [bad, good]
    # ... but the read whose bytes would be sent refuses them.
    assert reader.claim(bad) is None
    assert (spool.path / "corrupt" / f"{bad}.msg").exists()
    assert reader.ids(State.ACTIVE) == [] and reader.ids(State.QUEUED) == [good]
    line = next(r.getMessage() for r in caplog.records if "set aside" in r.getMessage())
    assert line.startswith(f"{bad}: ") and "CRC-32" in line
    claimed = reader.claim(good)
    assert claimed is not None and claimed.content == CONTENT + b"second\r\n"


def test_read_content_refuses_altered_bytes(spool: Spool) -> None:
    qid = spool.put(msg())
    flip_a_content_byte(spool.path / "queued" / f"{qid}.msg")
    with pytest.raises(ValueError, match="CRC-32"):
        fresh(spool).read_content(qid)
    assert fresh(spool).ids(State.QUEUED) == [qid]  # a reader sets nothing aside


def test_the_claim_checks_the_bytes_it_read_without_a_second_read(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    qid = spool.put(msg())
    reads: list[str] = []
    real = store.read_whole

    def counting(path: str | os.PathLike[str], size_hint: int | None = None) -> bytes:
        reads.append(str(path))
        return real(path, size_hint)

    monkeypatch.setattr(store, "read_whole", counting)
    claimed = fresh(spool).claim(qid)
    assert claimed is not None and claimed.content == CONTENT
    assert reads == [str(spool.path / "active" / f"{qid}.msg")]


@pytest.mark.parametrize("version", [9, 0, "1", True, None])
def test_an_unknown_format_version_is_set_aside_wherever_it_is_read(
        spool: Spool, caplog: pytest.LogCaptureFixture, version: object) -> None:
    at_scan, at_claim, at_start, good = (spool.put(msg()) for _ in range(4))
    for qid in (at_scan, at_claim, at_start):
        path = spool.path / "queued" / f"{qid}.msg"
        if version is None:
            header, content = split(path.read_bytes())
            del header["version"]
            write_file(path, header, content)
        else:
            set_version(path, version)
    reader = fresh(spool)
    with pytest.raises(ValueError, match="format version"):
        reader.get(at_scan)
    assert reader.list() == [reader.get(good)]  # `queue list` leaves it out, as other bad files
    assert reader.schedule_rows([at_scan, good]) == [(good, None, False)]
    assert reader.claim(at_claim) is None
    reader.recover()
    assert sorted(os.listdir(spool.path / "corrupt")) == sorted(f"{q}.msg" for q in (at_scan, at_claim, at_start))
    assert reader.ids(State.QUEUED) == [good]
    lines = [r.getMessage() for r in caplog.records if "set aside" in r.getMessage()]
    assert len(lines) == 3 and all(f"format version {version!r}" in line for line in lines)


def test_files_of_earlier_versions_without_length_or_crc_are_read_as_before(spool: Spool) -> None:
    # As relayd wrote them before the header carried "size" and "crc32" (git 1e970a0).
    qid = spool.put(msg())
    path = spool.path / "queued" / f"{qid}.msg"
    header, content = split(path.read_bytes())
    write_file(path, {"version": FORMAT_VERSION, "id": qid, "envelope": header["envelope"]}, content)
    reader = fresh(spool)
    reader.recover()
    assert reader.ids(State.QUEUED) == [qid] and os.listdir(spool.path / "corrupt") == []
    assert reader.get(qid).size == len(CONTENT)
    assert reader.read_content(qid) == CONTENT
    claimed = reader.claim(qid)
    assert claimed is not None and claimed.content == CONTENT


def test_check_header_and_check_content() -> None:
    header = {"version": FORMAT_VERSION, "size": len(CONTENT), "crc32": zlib.crc32(CONTENT)}
    check_header(header, len(CONTENT))
    check_content(header, CONTENT)
    with pytest.raises(ValueError, match="torn"):
        check_header(header, len(CONTENT) - 1)
    with pytest.raises(ValueError, match="format version 2"):
        check_header({**header, "version": 2}, len(CONTENT))
    with pytest.raises(ValueError, match="not a JSON object"):
        check_header([1], 0)
    with pytest.raises(ValueError, match="CRC-32"):
        check_content(header, CONTENT.replace(b"1", b"7"))
    check_content({"version": FORMAT_VERSION}, b"anything")  # no CRC recorded: as before


def test_parse_file_checks_length_version_and_crc(spool: Spool) -> None:
    qid = spool.put(msg())
    path = spool.path / "queued" / f"{qid}.msg"
    assert parse_file(path.read_bytes())[1] == CONTENT
    flip_a_content_byte(path)
    with pytest.raises(ValueError, match="CRC-32"):
        parse_file(path.read_bytes())


def test_a_tmp_file_of_another_version_is_set_aside_not_removed(
        spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    # A newer relayd may have acknowledged it (flushed, rename lost in a crash): this one can
    # neither check that it is complete nor deliver it, and must not delete it.
    qid = spool.put(msg())
    os.rename(spool.path / "queued" / f"{qid}.msg", spool.path / "tmp" / f"{qid}.msg")
    set_version(spool.path / "tmp" / f"{qid}.msg", 9)
    fresh(spool).recover()
    assert fresh(spool).ids(State.QUEUED) == [] and os.listdir(spool.path / "tmp") == []
    assert os.listdir(spool.path / "corrupt") == [f"{qid}.msg"]
    assert f"{qid}: spool file set aside" in caplog.text and "format version 9" in caplog.text


def test_import_leaves_altered_and_newer_files_in_the_source(tmp_path: Path) -> None:
    source = Spool(tmp_path / "dead", fsync=False)
    source.ensure_dirs()
    altered, newer, good = (source.put(msg()) for _ in range(3))
    flip_a_content_byte(source.path / "queued" / f"{altered}.msg")
    set_version(source.path / "queued" / f"{newer}.msg", 9)
    done = import_spool(tmp_path / "here", source.path, now=2000.0, fsync=False)
    assert [m[0] for m in done.messages] == [good]
    reasons = dict(done.skipped)
    assert "CRC-32" in reasons[str(source.path / "queued" / f"{altered}.msg")]
    assert "format version 9" in reasons[str(source.path / "queued" / f"{newer}.msg")]
    assert sorted(source.ids(State.QUEUED)) == sorted([altered, newer])  # left there, not lost
