"""``relayd user add|passwd|remove|list``: the submission users in ``users_file``.

A password comes from stdin (one line; its trailing newline is not part of it) or, with
``add --generate``, is made here and printed once: it is stored only as a scrypt hash
(relayd/users/store.py) and no command prints a hash or a password afterwards. The file is
replaced atomically with mode 0640; the running daemon picks the change up by itself.
"""

from __future__ import annotations

import argparse
import json
import secrets

from relayd.commands.io import EX_FAIL, EX_OK, IO
from relayd.errors import ConfigError
from relayd.units import parse_rate
from relayd.users.store import MAX_PASSWORD, NAME, User, check_pattern, hash_password, read_users, write_users


def _password(args: argparse.Namespace, io: IO) -> str | None:
    if getattr(args, "generate", False):
        return secrets.token_urlsafe(18)
    line = io.stdin.readline()
    password = line[:-1] if line.endswith("\n") else line
    password = password[:-1] if password.endswith("\r") else password
    if not password:
        print("relayd: no password on stdin (or use --generate)", file=io.err)
        return None
    if len(password) > MAX_PASSWORD or "\x00" in password:
        print(f"relayd: the password must be 1-{MAX_PASSWORD} characters without NUL",
              file=io.err)
        return None
    return password


def _add(args: argparse.Namespace, io: IO, users: dict[str, User]) -> dict[str, User] | None:
    if not NAME.match(args.name):
        print(f"relayd: invalid user name {args.name!r} (letters, digits, '_', '.', '@', '+', "
              "'-'; at most 64)", file=io.err)
        return None
    if args.name in users:
        print(f"relayd: user {args.name} exists (use `relayd user passwd {args.name}`)",
              file=io.err)
        return None
    try:
        allowed = tuple(check_pattern(a) for a in args.allowed_from)
        rate = parse_rate(args.rate) if args.rate is not None else None
    except ValueError as exc:
        print(f"relayd: {exc}", file=io.err)
        return None
    if args.daily_cap is not None and args.daily_cap < 1:
        print("relayd: --daily-cap must be at least 1", file=io.err)
        return None
    password = _password(args, io)
    if password is None:
        return None
    users[args.name] = User(name=args.name, password_hash=hash_password(password),
                            allowed_from=allowed, daily_cap=args.daily_cap, rate=rate,
                            priority=args.priority)
    if args.generate:
        print(f"password for {args.name} (shown only now): {password}", file=io.out)
    if not allowed:
        print(f"relayd: note: {args.name} may not send as any address until --allowed-from "
              "is given", file=io.err)
    return users


def main(args: argparse.Namespace, io: IO) -> int:
    cfg = io.config(args)
    if cfg.users_file is None:
        print("relayd: users_file is not set in the config", file=io.err)
        return EX_FAIL
    try:
        users = read_users(cfg.users_file)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"relayd: {problem}", file=io.err)
        return EX_FAIL
    action = args.user_command
    if action == "list":
        rows = [users[n].public() for n in sorted(users)]
        if args.json:
            print(json.dumps(rows, indent=2), file=io.out)
        else:
            for r in rows:
                limits = ", ".join(f"{k}={r[k]}" for k in ("daily_cap", "rate") if r[k] is not None)
                flags = " ".join(f for f in ("priority" if r["priority"] else "",
                                             "disabled" if r["disabled"] else "") if f)
                print(f"{r['name']}: allowed_from={','.join(r['allowed_from']) or '-'}"
                      f"{' ' + limits if limits else ''}{' ' + flags if flags else ''}",
                      file=io.out)
        return EX_OK
    if action == "add":
        new = _add(args, io, users)
    elif args.name not in users:
        print(f"relayd: no user named {args.name}", file=io.err)
        return EX_FAIL
    elif action == "remove":
        del users[args.name]
        new = users
    else:  # passwd
        password = _password(args, io)
        if password is None:
            return EX_FAIL
        old = users[args.name]
        users[args.name] = User(old.name, hash_password(password), old.allowed_from,
                                old.daily_cap, old.rate, old.priority, old.disabled)
        new = users
    if new is None:
        return EX_FAIL
    write_users(cfg.users_file, new)
    return EX_OK
