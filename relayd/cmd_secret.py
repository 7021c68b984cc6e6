"""``relayd secret keygen`` and ``relayd secret encrypt``: the config's encrypted secrets.

Both only need ``secrets.key_file``, so they read just that key from the YAML: keygen must work
before any secret exists, and encrypt must work while the rest of the file is still being
written (or names a secret that cannot be decrypted yet).
"""

from __future__ import annotations

import argparse
import getpass
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from relayd import secrets as sec
from relayd.cli import config_path
from relayd.config import SecretsConfig

if TYPE_CHECKING:
    from relayd.cli import IO

DEFAULT_KEY_FILE = SecretsConfig().key_file


class _KeyFileError(Exception):
    pass


def key_file_from_config(path: Path) -> Path:
    """``secrets.key_file`` of the config at ``path`` (relative to its directory), or the
    default when the key is absent. Nothing else in the file is validated. A missing config
    file is an error: guessing a key path would scatter keys around the system."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _KeyFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _KeyFileError(f"{path} is not valid YAML; fix it with 'relayd check-config'") from exc
    section = data.get("secrets") if isinstance(data, dict) else None
    value = section.get("key_file") if isinstance(section, dict) else None
    if value is None:
        return DEFAULT_KEY_FILE
    if not isinstance(value, str) or not value:
        raise _KeyFileError("secrets.key_file: must be a file system path")
    key = Path(value).expanduser()
    return key if key.is_absolute() else path.parent / key


def keygen(key_file: Path, io: IO) -> int:
    if key_file.exists():
        print(f"relayd: {key_file} already exists; not overwriting it (secrets encrypted with "
              "it would become unreadable). To replace a key see 'Key rotation' in "
              "docs/secrets.md.", file=io.err)
        return 1
    key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        # O_EXCL: never clobber a key created concurrently; 0600 from the start, no chmod race.
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"relayd: {key_file} already exists; not overwriting it", file=io.err)
        return 1
    except OSError as exc:
        print(f"relayd: cannot create {key_file}: {exc.strerror or exc}", file=io.err)
        return 1
    try:
        os.fchmod(fd, 0o600)   # in case the umask left fewer bits (never more)
        os.write(fd, sec.generate_key() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    print(f"created {key_file} (mode 0600); keep a copy in a safe place: without it the "
          "enc: values in the config cannot be decrypted", file=io.out)
    return 0


def _read_secret(io: IO) -> str:
    if io.stdin.isatty():
        return getpass.getpass("secret (not echoed): ", stream=io.err)
    return sec.strip_one_newline(io.stdin.read())


def encrypt(key_file: Path, io: IO) -> int:
    try:
        ring = sec.load_key(key_file)
    except OSError as exc:
        print(f"relayd: cannot read the key file {key_file} ({exc.strerror or exc}); create it "
              "with 'relayd secret keygen'", file=io.err)
        return 1
    except ValueError as exc:
        print(f"relayd: {exc}", file=io.err)
        return 1
    value = _read_secret(io)
    if not value:
        print("relayd: no secret on stdin", file=io.err)
        return 1
    if value.startswith(sec.ENC_PREFIX):
        # Re-encryption for key rotation: decrypt with any key of the ring, encrypt with the first.
        try:
            value = sec.decrypt(ring, value)
        except ValueError:
            print(f"relayd: the input is an enc: value that no key in {key_file} can decrypt",
                  file=io.err)
            return 1
    if any(c in value for c in "\r\n\x00"):
        print("relayd: a secret must be one line (no CR, LF or NUL)", file=io.err)
        return 1
    print(sec.encrypt(ring, value), file=io.out)
    return 0


def main(args: argparse.Namespace, io: IO) -> int:
    """``relayd secret keygen|encrypt``; 0 ok, 1 failed."""
    try:
        key_file = key_file_from_config(config_path(args))
    except _KeyFileError as exc:
        print(f"relayd: {exc}", file=io.err)
        return 1
    if args.secret_command == "keygen":
        return keygen(key_file, io)
    return encrypt(key_file, io)
