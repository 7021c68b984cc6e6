"""Start a process the way systemd starts a socket-activated service.

The listening socket is moved to fd 3 and ``LISTEN_PID`` is the child's own pid (bash sets it
to ``$$`` and ``exec`` keeps that pid), ``LISTEN_FDS=1``, ``LISTEN_FDNAMES`` as given. bash is
used rather than sh because dash cannot redirect descriptors above 9.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any


def spawn_socket_activated(argv: Sequence[str], sock: socket.socket, *, name: str = "smtp",
                           env: Mapping[str, str] | None = None, **popen: Any) -> subprocess.Popen:
    """Popen ``argv`` with ``sock`` as its fd 3; the caller may close its own copy afterwards."""
    fd = sock.fileno()
    script = (f'export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES={name}; '
              f'exec "$0" "$@" 3<&{fd} {fd}<&-')
    return subprocess.Popen(["bash", "-c", script, *argv], pass_fds=(fd,),
                            env=dict(env if env is not None else os.environ), **popen)
