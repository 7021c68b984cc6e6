"""The spool's JSON metadata keeps its format: a file written before ``Attempt.status`` became
a ``Status`` loads, and what relayd writes is byte for byte the JSON it wrote before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relayd.model import Envelope, Message, Status
from relayd.spool.records import meta_from_json, meta_to_json
from relayd.spool.store import Spool

# As relayd wrote it (json.dumps of meta_to_json, ensure_ascii=False), one status of each kind.
OLD = ('{"version": 1, "attempts": 2, "next_attempt": 1700000600.5, "last_error": "451 4.3.0 try later", '
       '"pending": ["b@example.net"], "failed_rcpts": ["c@example.net"], "recoveries": 1, '
       '"retried_at": null, "history": ['
       '{"at": 1700000000.25, "recipient": "a@example.net", "status": "sent", '
       '"relay": "primary[smtp.example.com]:587", "reply": "250 2.0.0 Ok", "dsn": "2.0.0"}, '
       '{"at": 1700000000.5, "recipient": "c@example.net", "status": "failed", '
       '"relay": "primary[smtp.example.com]:587", "reply": "550 5.1.1 no such user", "dsn": "5.1.1"}, '
       '{"at": 1700000001.0, "recipient": "b@example.net", "status": "deferred", '
       '"relay": "primary[smtp.example.com]:587", "reply": "451 4.3.0 try later", "dsn": "4.3.0"}, '
       '{"at": 1700000001.0, "recipient": "d@example.net", "status": "suppressed", '
       '"relay": "none", "reply": "on the do-not-email list", "dsn": ""}]}')


def test_old_metadata_loads_with_status_enums_and_is_written_back_unchanged() -> None:
    meta = meta_from_json(json.loads(OLD))
    assert [a.status for a in meta.history] == [Status.SENT, Status.FAILED, Status.DEFERRED,
                                                Status.SUPPRESSED]
    assert all(type(a.status) is Status for a in meta.history)
    assert json.dumps(meta_to_json(meta), ensure_ascii=False) == OLD


def test_the_spool_reads_an_old_meta_file_and_rewrites_the_same_bytes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", fsync=False)
    spool.ensure_dirs()
    qid = spool.put(Message(Envelope("app@example.com", ("b@example.net",)), b"Subject: x\r\n\r\nb\r\n"))
    meta_file = tmp_path / "s" / "meta" / f"{qid}.json"
    meta_file.write_text(OLD, encoding="utf-8")
    meta = spool.get(qid).meta
    assert meta.history[0].status is Status.SENT
    spool.write_meta(qid, meta)
    assert meta_file.read_text(encoding="utf-8") == OLD


def test_an_unknown_status_is_unreadable_metadata() -> None:
    with pytest.raises(ValueError):
        meta_from_json(json.loads(OLD.replace('"status": "sent"', '"status": "bounced"')))
