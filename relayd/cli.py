"""Command-line interface: parses argv, dispatches to one handler per command, maps errors
to exit codes. This is the only place that decides exit codes; handlers write to the
streams they are given.

Each command's handler lives in its own module (``relayd.cmd_*``) and has the signature
``handler(args, io) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from relayd import __version__
from relayd.config.load import load_config
from relayd.config.schema import DEFAULT_CONFIG_PATH, Config
from relayd.errors import ConfigError, RelaydError

EX_OK = 0
EX_FAIL = 1
EX_USAGE = 64
EX_DATAERR = 65
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_CONFIG = 78


@dataclass
class IO:
    """The streams a command handler may use (injected so tests can capture them)."""

    out: TextIO
    err: TextIO
    stdin: TextIO

    def config(self, args: argparse.Namespace) -> Config:
        """Load the config named by -c / $RELAYD_CONFIG / the default path."""
        return load_config(config_path(args))


def config_path(args: argparse.Namespace) -> Path:
    explicit = getattr(args, "config", None)
    if explicit:
        return Path(explicit)
    env = os.environ.get("RELAYD_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG_PATH


# command name -> "module:function"; the module is imported only when the command runs,
# so `relayd queue list` does not pay for importing the daemon.
HANDLERS = {
    "run": "relayd.commands.run:main",
    "check-config": "relayd.cli:check_config",
    "send-test": "relayd.commands.send_test:main",
    "queue": "relayd.commands.queue:main",
    "suppress": "relayd.commands.suppress:main",
    "secret": "relayd.commands.secret:main",
    "oauth": "relayd.commands.oauth:main",
    "explain": "relayd.commands.explain:main",
    "sendmail": "relayd.commands.sendmail:main",
    "_deliver": "relayd.commands.deliver:main",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relayd", description="Local SMTP relay with a durable spool.")
    parser.add_argument("-c", "--config", help="config file (default: $RELAYD_CONFIG, else "
                        f"{DEFAULT_CONFIG_PATH})")
    parser.add_argument("--version", action="version", version=f"relayd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    sub.add_parser("run", help="run the daemon in the foreground")
    # Internal: the delivery process of `relayd run` (relayd/daemon/split.py); not in --help.
    p = sub.add_parser("_deliver")
    p.add_argument("--notify-fd", type=int, required=True)
    p.add_argument("--events-fd", type=int, required=True)
    sub.add_parser("check-config", help="validate the config file")

    p = sub.add_parser("send-test", help="send one test message now, bypassing the spool")
    p.add_argument("--to", required=True, metavar="ADDR")
    p.add_argument("--smarthost", metavar="NAME")
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

    p = sub.add_parser("sendmail", help="sendmail-compatible submission from stdin",
                       add_help=False)
    p.add_argument("sendmail_args", nargs=argparse.REMAINDER)
    return parser


def check_config(args: argparse.Namespace, io: IO) -> int:
    """``relayd check-config``: ``config OK`` or one ``path: message`` line per problem."""
    try:
        cfg = io.config(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(str(problem), file=io.out)
        return EX_FAIL
    for warning in cfg.warnings:
        print(f"warning: {warning}", file=io.out)
    print("config OK", file=io.out)
    return EX_OK


def _dispatch(args: argparse.Namespace, io: IO) -> int:
    module_name, func_name = HANDLERS[args.command].split(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    result: int = handler(args, io)
    return result


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
            return _sendmail(head, argv[idx + 1:], io)
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


def _sendmail(head: list[str], rest: list[str], io: IO) -> int:
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
    return _sendmail([], rest, IO(sys.stdout, sys.stderr, sys.stdin))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
