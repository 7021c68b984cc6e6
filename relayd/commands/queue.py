"""``relayd queue list|show|retry|hold|release|delete|import``: the spool from the command line.

Works while the daemon runs: every change is a rename in the spool plus a "poke" file the
daemon picks up within a second. Output never includes secrets (the spool holds none) and
``show`` prints headers, not bodies.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

from relayd.commands.io import IO
from relayd.config.schema import Config
from relayd.errors import SpoolError, UnknownMessage
from relayd.model import State
from relayd.spool.records import Entry, valid_id
from relayd.spool.store import Spool

_MAX_HEADER_BYTES = 64 * 1024


def iso(ts: float | None) -> str | None:
    """ISO 8601 in UTC, seconds precision, or None."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def human_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def entry_json(e: Entry) -> dict[str, Any]:
    """The documented `queue list --json` object."""
    return {"id": e.id, "state": (State.QUEUED if e.state is State.ACTIVE else e.state).value,
            "sender": e.envelope.mail_from, "recipients": list(e.recipients), "size": e.size,
            "attempts": e.attempts, "next_attempt": iso(e.next_attempt) if e.state is not State.FAILED
            else None, "last_error": e.last_error, "created": iso(e.created),
            "priority": e.envelope.priority, "user": e.envelope.user or None,
            **({"route": e.envelope.route} if e.envelope.route else {})}


def _list(spool: Spool, args: argparse.Namespace, io: IO) -> int:
    state = State(args.state) if args.state else None
    entries = spool.list(state)
    if state is State.QUEUED:
        entries += spool.list(State.ACTIVE)  # being delivered right now: still "queued"
    if args.json:
        print(json.dumps([entry_json(e) for e in entries], indent=2), file=io.out)
        return 0
    if not entries:
        print("Mail queue is empty", file=io.out)
        return 0
    now = time.time()
    print(f"{'ID':<18} {'STATE':<7} {'AGE':>5} {'SIZE':>8} {'TRIES':>5}  {'NEXT':<20} SENDER -> RECIPIENTS",
          file=io.out)
    for e in entries:
        state_word = "queued" if e.state is State.ACTIVE else e.state.value
        nxt = iso(e.next_attempt) if e.next_attempt and e.state is State.QUEUED else "-"
        print(f"{e.id:<18} {state_word:<7} {human_age(now - e.created):>5} {e.size:>8} {e.attempts:>5}  "
              f"{nxt or '-':<20} <{e.envelope.mail_from}> -> {', '.join(e.recipients)}", file=io.out)
        if e.last_error:
            print(f"{'':<18} last error: {e.last_error}", file=io.out)
    print(f"-- {len(entries)} message(s)", file=io.out)
    return 0


def _headers(spool: Spool, e: Entry) -> str:
    content = spool.read_content(e.id)
    end = content.find(b"\r\n\r\n")
    head = content[: end if end >= 0 else _MAX_HEADER_BYTES][:_MAX_HEADER_BYTES]
    return head.decode("utf-8", "replace").replace("\r\n", "\n")


def _unknown(spool: Spool, qid: str) -> str:
    """The error for an ID that is in no queue state: set aside in corrupt/, or unknown."""
    corrupt = spool.path / "corrupt"
    if valid_id(qid) and (corrupt / f"{qid}.msg").exists():
        return (f"relayd: {qid} was set aside in {corrupt} (its spool file was unreadable or "
                "altered; the log says why) and will not be delivered")
    return f"relayd: no message with queue id {qid}"


def _show(spool: Spool, args: argparse.Namespace, io: IO) -> int:
    try:
        e = spool.get(args.id)
        headers = _headers(spool, e)
    except UnknownMessage:
        print(_unknown(spool, args.id), file=io.err)
        return 1
    except (ValueError, KeyError) as exc:  # damaged, altered, or a newer relayd's format
        print(f"relayd: {args.id}: its spool file cannot be used: {exc}; relayd sets such "
              f"files aside in {spool.path / 'corrupt'} and never delivers them", file=io.err)
        return 1
    except OSError as exc:
        print(f"relayd: {args.id}: cannot read its spool file: {exc.strerror or exc}", file=io.err)
        return 1
    history = [{"at": iso(a.at), "recipient": a.recipient, "status": a.status, "relay": a.relay,
                "dsn": a.dsn, "reply": a.reply} for a in e.history]
    if getattr(args, "json", False):
        out = entry_json(e) | {"envelope": {"mail_from": e.envelope.mail_from,
                                            "rcpt_tos": list(e.envelope.rcpt_tos),
                                            "client": e.envelope.client, "helo": e.envelope.helo},
                               "history": history, "headers": headers}
        print(json.dumps(out, indent=2), file=io.out)
        return 0
    j = entry_json(e)
    lines = [f"id:           {e.id}", f"state:        {j['state']}",
             f"created:      {j['created']}", f"size:         {e.size}",
             f"sender:       <{e.envelope.mail_from}>",
             f"recipients:   {', '.join(e.envelope.rcpt_tos)}",
             f"pending:      {', '.join(e.pending) or '-'}",
             f"client:       [{e.envelope.client}] helo={e.envelope.helo}",
             f"priority:     {'yes' if e.envelope.priority else 'no'}",
             f"user:         {e.envelope.user or '-'}"
             + (f" (sasl_method={e.envelope.auth_method})" if e.envelope.user else ""),
             f"attempts:     {e.attempts}", f"next attempt: {j['next_attempt'] or '-'}",
             f"last error:   {e.last_error or '-'}"]
    if e.envelope.route:  # only with routes (docs/routing.md)
        lines.insert(9, f"route:        {e.envelope.route}")
    if e.meta.throttled:
        lines.append(f"throttled:    {e.meta.throttled} of the attempts (reply rules)")
    if e.meta.failed_rcpts:
        lines.append(f"failed:       {', '.join(e.meta.failed_rcpts)}")
    lines.append("history:")
    lines += [f"  {h['at']} {h['status']:<10} {h['recipient']} relay={h['relay'] or 'none'} {h['reply']}"
              for h in history] or ["  (no attempts yet)"]
    lines += ["headers:", *("  " + line for line in headers.split("\n"))]
    print("\n".join(lines), file=io.out)
    return 0


def _each(spool: Spool, ids: list[str], action: str, io: IO, *, listed: frozenset[str] = frozenset()) -> int:
    """Apply ``action`` to each ID. ``listed`` IDs came from the queue itself (`--all`): one
    that is gone by its turn was delivered or deleted meanwhile, which is no error."""
    fn = {"hold": spool.hold, "release": spool.release, "delete": spool.delete,
          "retry": spool.retry}[action]
    status = 0
    for qid in ids:
        try:
            fn(qid)
        except UnknownMessage:
            if qid in listed:
                print(f"{qid}: no longer in the queue (delivered or deleted meanwhile)", file=io.out)
                continue
            print(_unknown(spool, qid), file=io.err)
            status = 1
        except SpoolError as exc:
            print(f"relayd: {exc}", file=io.err)
            status = 1
        else:
            print(f"{qid}: {_PAST[action]}", file=io.out)
    return status


_PAST = {"hold": "held", "release": "released", "delete": "deleted", "retry": "scheduled for delivery now"}


def run(cfg: Config, args: argparse.Namespace, io: IO) -> int:
    spool = Spool(cfg.spool.path)
    if not spool.path.is_dir():
        print(f"relayd: no spool at {spool.path} (has relayd run yet?)", file=io.err)
        return 1 if args.queue_command != "list" else _empty(args, io)
    cmd = args.queue_command
    if cmd == "import":
        return _import(spool, args, io)
    if cmd == "list":
        return _list(spool, args, io)
    if cmd == "show":
        return _show(spool, args, io)
    if cmd == "retry":
        ids = list(args.ids)
        listed: frozenset[str] = frozenset()
        if args.all:
            listed = frozenset(e.id for e in spool.list(State.QUEUED) + spool.list(State.FAILED))
            ids += sorted(listed - set(ids))
        if not ids:
            print("relayd: queue retry needs message IDs or --all", file=io.err)
            return 64
        return _each(spool, ids, "retry", io, listed=listed)
    return _each(spool, list(args.ids), cmd, io)


def _import(spool: Spool, args: argparse.Namespace, io: IO) -> int:
    """Another node's spool moved into this one (relayd/spool/importing.py)."""
    # lazy: only this action needs it
    from relayd.spool.importing import import_spool

    source = Path(args.dir)
    try:
        done = import_spool(spool.path, source, now=time.time())
    except SpoolError as exc:
        print(f"relayd: {exc}", file=io.err)
        return 1
    except OSError as exc:
        print(f"relayd: cannot import from {source}: {exc.strerror or exc}", file=io.err)
        return 1
    if done.finished:
        print(f"finished {done.finished} message(s) an interrupted import had begun", file=io.out)
    for old, new, state in done.messages:
        renamed = f" as {new}" if new != old else ""
        print(f"{old}: imported{renamed} ({state.value})", file=io.out)
    for path, why in done.skipped:
        print(f"relayd: {path}: not imported: {why}", file=io.err)
    print(f"-- {len(done.messages)} message(s) imported from {source} into {spool.path}"
          + (f", {len(done.skipped)} left there" if done.skipped else ""), file=io.out)
    return 1 if done.skipped else 0


def _empty(args: argparse.Namespace, io: IO) -> int:
    print("[]" if args.json else "Mail queue is empty", file=io.out)
    return 0


def main(args: argparse.Namespace, io: IO) -> int:
    return run(io.config(args), args, io)
