"""``relayd check-config``: validate the config file and say what is wrong, one line per problem.

Prints ``config OK`` (after any ``warning:`` lines, e.g. a plain-text secret) and exits 0, or
prints each problem as ``path.to.key: message`` (SPEC: scripts parse these) and exits 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from relayd.commands.io import EX_FAIL, EX_OK, IO
from relayd.config.schema import Config
from relayd.errors import ConfigError

if TYPE_CHECKING:
    import argparse

    from relayd.config.schema import Config


def main(args: argparse.Namespace, io: IO) -> int:
    """``config OK`` or one ``path: message`` line per problem."""
    try:
        cfg = io.config(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(str(problem), file=io.out)
        return EX_FAIL
    files = submission_problems(cfg) + dkim_key_problems(cfg)
    if files:
        for line in files:
            print(line, file=io.out)
        return EX_FAIL
    for warning in cfg.warnings:
        print(f"warning: {warning}", file=io.out)
    print("config OK", file=io.out)
    return EX_OK


def submission_problems(cfg: Config) -> list[str]:
    """The files a submission listener reads at start: the users file (mode, content) and
    each certificate with its key, as ``path: message`` lines."""
    out: list[str] = []
    if cfg.users_file is not None:
        # lazy: the users room and ssl only where submission is configured
        from relayd.users.store import read_users

        try:
            read_users(cfg.users_file)
        except ConfigError as exc:
            out += [str(p) for p in exc.problems]
    for i, sub in enumerate(cfg.submission):
        from relayd.smtpd.tls import load_context  # lazy: as above

        try:
            load_context(sub.cert_file, sub.key_file)
        except (OSError, ValueError) as exc:
            out.append(f"submission[{i}].cert_file: cannot load {sub.cert_file} with "
                       f"{sub.key_file}: {exc}")
    return out


def dkim_key_problems(cfg: Config) -> list[str]:
    """``dkim[i].private_key_file: why`` for each key file that exists but cannot sign with its
    entry's algorithm. A file that is not there yet is left to the daemon, which logs it at
    start and sends that domain's mail unsigned (keys are often installed after the config)."""
    if not cfg.dkim:
        return []
    # lazy: check-config loads neither the policy nor cryptography (~5 MB, slower start)
    # unless there are keys to check (tests/integration/test_command_imports.py).
    from relayd.policy.dkim import DkimKeyError, load_private_key

    problems = []
    for i, k in enumerate(cfg.dkim):
        try:
            pem = k.private_key_file.read_bytes()
        except OSError:
            continue
        try:
            load_private_key(pem, k.algorithm)
        except DkimKeyError as exc:
            problems.append(f"dkim[{i}].private_key_file: {exc}")
    return problems
