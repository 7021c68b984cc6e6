"""Whether the spool can store mail, as the intake last found it.

The accepting process (relayd/smtpd/intake.py) finds out: a store that fails (disk full, out
of inodes, read-only file system, EIO at fsync, permission denied) makes it answer 451 to the
application, and the next store that succeeds ends the outage. The alerts live with the
delivery (relayd/control/alerts.py, ``spool_unwritable``): the record reaches them over the
notify pipe (relayd/daemon/pipe.py) or, in one process, by a direct call. It never carries
message content or addresses: the spool's path and the operating system's reason only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpoolHealth:
    """``writable`` False: a store failed with ``error`` (e.g. "No space left on device");
    True: a store succeeded again after a failure."""

    writable: bool
    path: str
    error: str = ""
