"""Command-line interface: parses argv, dispatches to one handler per command, maps errors
to exit codes. This is the only place that decides exit codes; handlers write to the
streams they are given.

Each command's handler is ``main(args, io) -> int`` in its own module of ``relayd.commands``,
imported only when that command runs (``HANDLERS``); the handlers import the streams, the
config path and the exit codes from ``relayd.commands.io``, never this module.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from relayd import __version__
from relayd.commands.io import (
    EX_CONFIG,
    EX_FAIL,
    EX_OK,
    EX_USAGE,
    IO,
    config_path,
)
from relayd.config.schema import DEFAULT_CONFIG_PATH
from relayd.errors import ConfigError, RelaydError

# Tests and scripts build an IO and read exit codes from here, as before the handlers moved.
__all__ = ["EX_CONFIG", "EX_FAIL", "EX_OK", "EX_USAGE", "HANDLERS", "IO", "build_parser",
           "config_path", "main", "sendmail_main"]

Handler = Callable[[argparse.Namespace, IO], int]


# One function per command, each importing its module when called: `relayd queue list` must
# not pay for the daemon (aiosmtpd, aiosmtplib, uvloop), nor sendmail, run once per message
# from PHP or cron, for anything but itself. Plain imports, so mypy checks every call.
def _run(args: argparse.Namespace, io: IO) -> int:
    from relayd.commands import run  # lazy: each command loads only its own modules
    return run.main(args, io)


def _deliver(args: argparse.Namespace, io: IO) -> int:
    from relayd.commands import deliver  # lazy: each command loads only its own modules
    return deliver.main(args, io)


def _check_config(args: argparse.Namespace, io: IO) -> int:
    from relayd.commands import check_config  # lazy: each command loads only its own modules
    return check_config.main(args, io)


def _send_test(args: argparse.Namespace, io: IO) -> int:
    from relayd.commands import send_test  # lazy: each command loads only its own modules
    return send_test.main(args, io)


def _queue(args: argparse.Namespace, io: IO) -> int:
    from relayd.commands import queue  # lazy: each command loads only its own modules
    return queue.main(args, io)


def _suppress(args: argparse.Namespace, io: IO) -> int:
    from relayd.commands import suppress  # lazy: each command loads only its own modules
    return suppress.main(args, io)


def _shared_state(args: argparse.Namespace, io: IO) -> int:
    from relayd.commands import shared_state  # lazy: each command loads only its own modules
    return shared_state.main(args, io)


def _secret(args: argparse.Namespace, io: IO) -> int:
    from relayd.commands import secret  # lazy: each command loads only its own modules
    return secret.main(args, io)


def _oauth(args: argparse.Namespace, io: IO) -> int:
    from relayd.commands import oauth  # lazy: each command loads only its own modules
    return oauth.main(args, io)


def _explain(args: argparse.Namespace, io: IO) -> int:
    from relayd.commands import explain  # lazy: each command loads only its own modules
    return explain.main(args, io)


def _user(args: argparse.Namespace, io: IO) -> int:
    from relayd.commands import user  # lazy: each command loads only its own modules
    return user.main(args, io)


def _route(args: argparse.Namespace, io: IO) -> int:
    from relayd.commands import route  # lazy: each command loads only its own modules
    return route.main(args, io)


def _sendmail(args: argparse.Namespace, io: IO) -> int:
    from relayd.commands import sendmail  # lazy: each command loads only its own modules
    return sendmail.main(args, io)


HANDLERS: dict[str, Handler] = {
    "run": _run,
    "check-config": _check_config,
    "send-test": _send_test,
    "queue": _queue,
    "suppress": _suppress,
    "shared-state": _shared_state,
    "secret": _secret,
    "oauth": _oauth,
    "explain": _explain,
    "route": _route,
    "sendmail": _sendmail,
    "user": _user,
    "_deliver": _deliver,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relayd", description="Local SMTP relay with a durable spool.")
    parser.add_argument("-c", "--config", help="config file (default: $RELAYD_CONFIG, else "
                        f"{DEFAULT_CONFIG_PATH})")
    parser.add_argument("--version", action="version", version=f"relayd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    sub.add_parser("run", help="run the daemon in the foreground")
    # Internal: the delivery process of `relayd run` (relayd/daemon/child.py); not in --help.
    p = sub.add_parser("_deliver")
    p.add_argument("--notify-fd", type=int, required=True)
    p.add_argument("--events-fd", type=int, required=True)
    sub.add_parser("check-config", help="validate the config file")

    p = sub.add_parser("send-test", help="send one test message now, bypassing the spool")
    p.add_argument("--to", required=True, metavar="ADDR")
    p.add_argument("--smarthost", metavar="NAME")
    p.add_argument("--route", metavar="NAME", help="through this route's smarthosts, in order, "
                   "with its envelope sender")
    p.add_argument("--from", dest="from_", metavar="ADDR", help="envelope sender")

    q = sub.add_parser("queue", help="inspect and manage the spool").add_subparsers(
        dest="queue_command", metavar="ACTION")
    q.required = True
    p = q.add_parser("list", help="one row per message")
    p.add_argument("--json", action="store_true")
    p.add_argument("--state", choices=["queued", "held", "failed"])
    p = q.add_parser("show", help="envelope, state, history and headers of one message")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p = q.add_parser("retry", help="make messages due now (failed ones go back to queued)")
    p.add_argument("ids", nargs="*", metavar="ID")
    p.add_argument("--all", action="store_true")
    p = q.add_parser("import", help="move another (stopped) node's spool into this one")
    p.add_argument("dir", metavar="DIR", help="the other node's spool directory")
    for name, text in (("hold", "take messages out of delivery"),
                       ("release", "put held messages back into delivery"),
                       ("delete", "remove messages")):
        p = q.add_parser(name, help=text)
        p.add_argument("ids", nargs="+", metavar="ID")

    s = sub.add_parser("suppress", help="manage the do-not-email list").add_subparsers(
        dest="suppress_command", metavar="ACTION")
    s.required = True
    s.add_parser("add").add_argument("addresses", nargs="+", metavar="ADDR")
    s.add_parser("remove").add_argument("addresses", nargs="+", metavar="ADDR")
    s.add_parser("list").add_argument("--json", action="store_true")
    s.add_parser("import").add_argument("file", metavar="FILE")

    st = sub.add_parser("shared-state", help="the fleet's PostgreSQL database (shared_state)"
                        ).add_subparsers(dest="shared_state_command", metavar="ACTION")
    st.required = True
    st.add_parser("migrate", help="create or upgrade relayd's tables")
    st.add_parser("import", help="copy this node's embedded do-not-email list and counters in")

    sec = sub.add_parser("secret", help="encrypt secrets for the config").add_subparsers(
        dest="secret_command", metavar="ACTION")
    sec.required = True
    sec.add_parser("encrypt", help="read a secret on stdin, print enc:...")
    sec.add_parser("keygen", help="create secrets.key_file (mode 0600) if absent; an "
                   "existing key file is left as it is")

    o = sub.add_parser("oauth", help="OAuth2 tokens for XOAUTH2").add_subparsers(
        dest="oauth_command", metavar="ACTION")
    o.required = True
    o.add_parser("token").add_argument("--smarthost", metavar="NAME")
    o.add_parser("authorize").add_argument("--smarthost", metavar="NAME")

    p = sub.add_parser("explain", help="dry run of the policy for one message")
    p.add_argument("file", nargs="?", metavar="FILE")
    p.add_argument("--from", dest="from_", metavar="ADDR")
    p.add_argument("--to", nargs="+", action="extend", default=[], metavar="ADDR")
    p.add_argument("--user", metavar="NAME", help="as submitted by this submission user: "
                   "its sender authorization and limits")

    u = sub.add_parser("user", help="manage the submission users (users_file)").add_subparsers(
        dest="user_command", metavar="ACTION")
    u.required = True
    p = u.add_parser("add", help="add a user; the password is read from stdin (one line)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--allowed-from", nargs="+", action="extend", default=[], metavar="ADDR",
                   help="addresses, @domain or * the user may send as (default: none)")
    p.add_argument("--daily-cap", type=int, metavar="N")
    p.add_argument("--rate", metavar="R", help="e.g. 1/s, 100/h")
    p.add_argument("--priority", action="store_true", help="mail from this user is priority")
    p.add_argument("--generate", action="store_true",
                   help="generate the password and print it once")
    u.add_parser("passwd", help="change a password (stdin)").add_argument("name", metavar="NAME")
    u.add_parser("remove", help="remove a user").add_argument("name", metavar="NAME")
    u.add_parser("list", help="list users (never a hash or password)").add_argument(
        "--json", action="store_true")

    r = sub.add_parser("route", help="which route mail takes").add_subparsers(
        dest="route_command", metavar="ACTION")
    r.required = True
    p = r.add_parser("test", help="the route, smarthosts, limits and reply rules per recipient")
    p.add_argument("--from", dest="from_", required=True, metavar="ADDR")
    p.add_argument("--to", nargs="+", action="extend", required=True, metavar="ADDR")
    p.add_argument("--user", metavar="NAME", help="as mail submitted by this authenticated user")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("sendmail", help="sendmail-compatible submission from stdin",
                       add_help=False)
    p.add_argument("sendmail_args", nargs=argparse.REMAINDER)
    return parser


def _dispatch(args: argparse.Namespace, io: IO) -> int:
    return HANDLERS[args.command](args, io)


def main(argv: Sequence[str] | None = None, *, io: IO | None = None) -> int:
    """Run ``relayd`` with ``argv`` (default: sys.argv[1:]); returns the exit code."""
    io = io or IO(sys.stdout, sys.stderr, sys.stdin)
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.path.basename(sys.argv[0]) == "mailq" and argv is not None and not argv:
        argv = ["sendmail", "-bp"]
    # `relayd sendmail ...` takes sendmail's own flags verbatim, so split before argparse.
    if "sendmail" in argv:
        idx = argv.index("sendmail")
        head = argv[:idx]
        if all(a.startswith("-") or (i > 0 and head[i - 1] in ("-c", "--config"))
               for i, a in enumerate(head)):
            return _sendmail_argv(head, argv[idx + 1:], io)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if exc.code in (0, None) else EX_USAGE
    try:
        return _dispatch(args, io)
    except ConfigError as exc:
        print(f"relayd: invalid config {config_path(args)}:", file=io.err)
        for problem in exc.problems:
            print(f"  {problem}", file=io.err)
        return EX_CONFIG if args.command != "check-config" else EX_FAIL
    except RelaydError as exc:
        print(f"relayd: {exc}", file=io.err)
        return EX_FAIL
    except KeyboardInterrupt:
        return 130


def _sendmail_argv(head: list[str], rest: list[str], io: IO) -> int:
    """``relayd [-c FILE] sendmail REST...``: REST is sendmail's argv, never parsed here."""
    parser = argparse.ArgumentParser(prog="relayd")
    parser.add_argument("-c", "--config")
    args, _ = parser.parse_known_args(head)
    args.command = "sendmail"
    args.sendmail_args = rest
    return _dispatch(args, io)


def sendmail_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``relayd-sendmail`` (and of a ``sendmail``/``mailq`` symlink)."""
    rest = list(sys.argv[1:] if argv is None else argv)
    if os.path.basename(sys.argv[0]) == "mailq" and not rest:
        rest = ["-bp"]
    return _sendmail_argv([], rest, IO(sys.stdout, sys.stderr, sys.stdin))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
