"""``relayd secret keygen`` and ``relayd secret encrypt``: the config's encrypted secrets.

Both only need ``secrets.key_file``, so they read just that key from the YAML: keygen must work
before any secret exists, and encrypt must work while the rest of the file is still being
written (or names a secret that cannot be decrypted yet).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import getpass
import os
from pathlib import Path
from typing import Any

import yaml

from relayd import secrets as sec
from relayd.commands.io import IO, config_path
from relayd.config.schema import SecretsConfig

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
    """Create ``key_file`` if absent; an existing one is never touched (SPEC), so
    configuration management can run this on every deploy. Exit 0 when the key file is (now)
    a valid key, 1 when it exists but is not one, or cannot be created."""
    if os.path.lexists(key_file):
        return _existing_key(key_file, io)
    try:
        key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        print(f"relayd: cannot create the directory {key_file.parent}: {exc.strerror or exc}",
              file=io.err)
        return 1
    try:
        # O_EXCL: never clobber a key created concurrently; 0600 from the start, no chmod race.
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _existing_key(key_file, io)   # another keygen won the race
    except OSError as exc:
        print(f"relayd: cannot create {key_file}: {exc.strerror or exc}", file=io.err)
        return 1
    key = sec.generate_key() + b"\n"
    try:
        os.fchmod(fd, 0o600)   # in case the umask left fewer bits (never more)
        if os.write(fd, key) != len(key):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.fsync(fd)
    except OSError as exc:
        # A half-written key file would be refused by every later run (and by the daemon):
        # remove what this run created so that the next run simply starts again.
        with contextlib.suppress(OSError):
            os.unlink(key_file)
        print(f"relayd: cannot write {key_file}: {exc.strerror or exc}", file=io.err)
        return 1
    finally:
        os.close(fd)
    print(f"created {key_file} (mode 0600); keep a copy in a safe place: without it the "
          "enc: values in the config cannot be decrypted", file=io.out)
    return 0


def _existing_key(key_file: Path, io: IO) -> int:
    """Report on a key file that is already there, without writing to it: 0 when it holds a
    valid key, 1 (naming the file, never its content) when it does not, because a deploy
    script must notice a key that cannot decrypt anything."""
    try:
        sec.load_key(key_file)
    except OSError as exc:
        print(f"relayd: {key_file} exists but cannot be read ({exc.strerror or exc}); "
              "left as it is", file=io.err)
        return 1
    except ValueError:
        print(f"relayd: {key_file} exists but is not a valid relayd key; left as it is. "
              "Restore the right key file, or, if no enc: value needs it, move it aside and "
              "run 'relayd secret keygen' again (docs/secrets.md).", file=io.err)
        return 1
    print(f"{key_file} already exists and holds a valid key; left as it is", file=io.out)
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
