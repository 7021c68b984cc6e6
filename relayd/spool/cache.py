"""The spool's bounded in-memory copy of messages it has just stored.

A message stays here from ``Spool.put`` until ``Spool.claim`` hands it, content included, to
its first delivery attempt, so the queue manager neither re-reads nor re-parses a file just
written. Only the spool reads it; nobody else asks it for content. Bounded by total content
size (oldest dropped first) so a backlog cannot grow the daemon; whatever is not here is read
from disk. Thread-safe: the spool's worker threads and the reaper share it.
"""

from __future__ import annotations

import threading

from relayd.model import Message

RECENT_CACHE_BYTES = 4 * 1024 * 1024


class RecentMessages:
    """Just-stored messages by queue ID, at most ``limit`` bytes of content in all."""

    def __init__(self, limit: int = RECENT_CACHE_BYTES, *, enabled: bool = True) -> None:
        self._limit = limit if enabled else 0
        self._messages: dict[str, Message] = {}  # insertion order = age
        self.bytes = 0
        self._lock = threading.Lock()

    def remember(self, queue_id: str, message: Message) -> None:
        size = len(message.content)
        if size > self._limit // 4:  # one large message would push out all the small ones
            return
        with self._lock:
            self._messages[queue_id] = message
            self.bytes += size
            while self.bytes > self._limit:
                oldest = self._messages.pop(next(iter(self._messages)))
                self.bytes -= len(oldest.content)

    def get(self, queue_id: str) -> Message | None:
        with self._lock:
            return self._messages.get(queue_id)

    def pop(self, queue_id: str) -> Message | None:
        with self._lock:
            m = self._messages.pop(queue_id, None)
            if m is not None:
                self.bytes -= len(m.content)
        return m
