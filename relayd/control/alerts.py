"""Operator alerts: a JSON webhook POST and/or an email when something needs a human.

Components call ``fire(event, key, message)`` when a condition starts (``smarthost_down`` for
smarthost ``primary``) and ``clear(event, key, message)`` when it ends. An outage therefore
sends one alert, not one per message or per retry: a (event, key) pair that is already active
is only re-notified after ``renotify_after`` (default 6 h), and its end sends one recovery
notice. Delivery runs in a background task fed by a bounded queue, so ``fire``/``clear`` never
block or raise into the caller; a webhook or mail failure is logged and dropped.

In a fleet (``shared_state``) the events about what the nodes share (a smarthost, the daily
cap: ``FLEET_EVENTS``) go through the fleet's table before they are sent
(relayd/shared/alerts.py): the first node to fire notifies, naming the nodes that saw the
outage, and the last to clear sends the one recovery. The sender asks the database in a worker
thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol
from urllib.parse import unquote, urlsplit

from relayd.config.schema import AlertsConfig
from relayd.errors import StateUnavailable
from relayd.spool.health import SpoolHealth

log = logging.getLogger("relayd.alerts")

SendEmail = Callable[[bytes, str], Awaitable[None]]

DEFAULT_RENOTIFY = 6 * 3600.0
QUEUE_SIZE = 256
HTTP_TIMEOUT = 10.0
# Per event, at most this many new-key notifications per hour: 500 messages failing for the
# same reason (an unverified sender) must not become 500 alerts.
EVENT_BURST = 5
EVENT_WINDOW = 3600.0
MAX_TRACKED = 10_000
# The events about what a fleet's nodes share: one notice per outage for the fleet.
FLEET_EVENTS = frozenset({"smarthost_down", "auth_failed", "daily_cap_reached"})
# The node that notifies waits this long first, so that the nodes meeting the same outage at
# the same moment are named in the one notice.
FLEET_GATHER = 3.0


class Fleet(Protocol):
    """Who notifies in a fleet (relayd.shared.alerts.FleetAlerts); blocking calls that raise
    StateUnavailable while the database cannot be reached."""

    node: str

    def fire(self, event: str, key: str, since: float, repeat: bool) -> tuple[bool, tuple[str, ...]]: ...

    def clear(self, event: str, key: str) -> tuple[bool, tuple[str, ...]]: ...

    def seen(self, event: str, key: str) -> tuple[str, ...]: ...

    def leave(self) -> None: ...


@dataclass(frozen=True)
class Notice:
    """One notification to deliver: ``state`` is ``firing`` or ``resolved``."""

    event: str
    key: str
    state: str
    message: str
    at: float
    since: float
    repeat: bool = False
    suppressed: int = 0  # notifications of this event held back by the per-event limit
    nodes: tuple[str, ...] = ()  # in a fleet: the nodes that saw it

    def payload(self, hostname: str) -> dict[str, object]:
        """The webhook's JSON object (documented in docs/operations.md)."""
        word = "FIRING" if self.state == "firing" else "RESOLVED"
        seen = f" (seen by {', '.join(self.nodes)})" if self.nodes else ""
        payload: dict[str, object] = {
            "source": "relayd",
            "host": hostname,
            "event": self.event,
            "key": self.key,
            "state": self.state,
            "message": self.message,
            "time": _iso(self.at),
            "since": _iso(self.since),
            "repeat": self.repeat,
            "suppressed": self.suppressed,
            # Slack/Mattermost-compatible incoming webhooks show "text" as is.
            "text": f"[relayd {hostname}] {word} {self.event} {self.key}: {self.message}{seen}"
                    + (f" (+{self.suppressed} similar not sent)" if self.suppressed else ""),
        }
        if self.nodes:   # only in a fleet: a single relay's payload is unchanged
            payload["nodes"] = list(self.nodes)
        return payload


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Alerts:
    """Deduplicating, rate-limited alert sender for the events listed in ``alerts.events``."""

    def __init__(self, cfg: AlertsConfig, *, hostname: str, send_email: SendEmail | None = None,
                 clock: Callable[[], float] = time.time,
                 renotify_after: float = DEFAULT_RENOTIFY,
                 ssl_context: ssl.SSLContext | None = None,
                 queue_size: int = QUEUE_SIZE, event_burst: int = EVENT_BURST,
                 event_window: float = EVENT_WINDOW, fleet: Fleet | None = None,
                 gather: float = FLEET_GATHER) -> None:
        self._cfg = cfg
        self._hostname = hostname
        self._send_email = send_email
        self._clock = clock
        self._renotify_after = renotify_after
        self._ssl = ssl_context
        self._queue: asyncio.Queue[Notice] = asyncio.Queue(maxsize=queue_size)
        # (event, key) -> (active since, last notified, a firing notice was sent)
        self._active: dict[tuple[str, str], tuple[float, float, bool]] = {}
        self._burst = event_burst
        self._window = event_window
        # event -> (window start, notifications in window, held back since last notification)
        self._budget: dict[str, tuple[float, int, int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._fleet = fleet
        self._gather = gather
        self._notified: set[tuple[str, str]] = set()  # fleet alerts this node announced
        self.sent = 0      # notifications delivered to at least one channel (for tests/metrics)
        self.dropped = 0   # notifications lost to a full queue

    @property
    def active(self) -> frozenset[tuple[str, str]]:
        """The (event, key) pairs currently firing."""
        return frozenset(self._active)

    def _wanted(self, event: str) -> bool:
        return event in self._cfg.events

    def fire(self, event: str, key: str, message: str) -> None:
        """A condition started (or is still true). Notifies once per outage, then at most every
        ``renotify_after`` seconds while it lasts. Never raises, never blocks."""
        if not self._wanted(event):
            return
        now = self._clock()
        state = self._active.get((event, key))
        if state is None:
            if len(self._active) >= MAX_TRACKED:
                self._forget_stale(now)
            log.warning("alert: %s %s: %s", event, key, message)
            sent = self._notify(Notice(event, key, "firing", message, now, now))
            self._active[(event, key)] = (now, now, sent)
        elif now - state[1] >= self._renotify_after:
            log.warning("alert (still active): %s %s: %s", event, key, message)
            sent = self._notify(Notice(event, key, "firing", message, now, state[0],
                                       repeat=state[2]))
            self._active[(event, key)] = (state[0], now, state[2] or sent)

    def _notify(self, notice: Notice) -> bool:
        """Apply the per-event budget, then queue the notice; False if held back."""
        start, used, held = self._budget.get(notice.event, (notice.at, 0, 0))
        if notice.at - start >= self._window:
            start, used = notice.at, 0
        if used >= self._burst:
            self._budget[notice.event] = (start, used, held + 1)
            return False
        self._budget[notice.event] = (start, used + 1, 0)
        self._enqueue(dataclasses.replace(notice, suppressed=held))
        return True

    def _forget_stale(self, now: float) -> None:
        # Keys that never clear (message_failed per queue ID) must not grow without bound.
        for k, (_since, last, _sent) in list(self._active.items()):
            if now - last >= self._renotify_after:
                del self._active[k]

    def clear(self, event: str, key: str, message: str) -> None:
        """The condition ended: one recovery notice if an alert was sent for it."""
        state = self._active.pop((event, key), None)
        if state is None or not state[2]:
            return  # nothing was announced, so there is nothing to call off
        now = self._clock()
        log.info("alert resolved: %s %s: %s", event, key, message)
        self._enqueue(Notice(event, key, "resolved", message, now, state[0]))

    def check_queue_age(self, oldest_age: float) -> None:
        """Fire or clear ``queue_age`` from the age of the oldest queued message."""
        limit = self._cfg.queue_age
        if oldest_age > limit:
            self.fire("queue_age", "queue", f"oldest queued message is {oldest_age / 60:.0f} min "
                      f"old (alerts.queue_age is {limit / 60:.0f} min)")
        else:
            self.clear("queue_age", "queue", "no queued message is older than alerts.queue_age")

    def spool_health(self, health: SpoolHealth) -> None:
        """Fire ``spool_unwritable`` when a store failed, clear it when one succeeded again
        (the intake reports both, relayd/spool/health.py)."""
        if health.writable:
            self.clear("spool_unwritable", "spool", f"the spool {health.path} accepts mail again")
        else:
            self.fire("spool_unwritable", "spool",
                      f"the spool {health.path} cannot store mail ({health.error}); every "
                      "message is answered 451 4.3.0 until a store succeeds")

    def _channels(self) -> bool:
        return bool(self._cfg.webhook or (self._cfg.email and self._send_email))

    def _enqueue(self, notice: Notice) -> None:
        if not self._channels():
            return
        try:
            self._queue.put_nowait(notice)
        except asyncio.QueueFull:
            self.dropped += 1
            log.error("alert queue full; dropped %s %s notice", notice.event, notice.key)

    async def start(self) -> None:
        """Start the background sender (idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="relayd-alerts")

    async def run(self) -> None:
        """Deliver queued notices forever (run it in the daemon's TaskGroup or via start())."""
        if self._fleet is not None and self._channels():
            try:
                await asyncio.to_thread(self._fleet.leave)
            except StateUnavailable as exc:
                log.warning("alerts: cannot tell the fleet this node started: %s", exc)
        while True:
            notice = await self._queue.get()
            try:
                await self._deliver(notice)
            finally:
                self._queue.task_done()

    async def wait_idle(self) -> None:
        """Wait until every queued notice has been attempted."""
        await self._queue.join()

    async def close(self, grace: float = 5.0) -> None:
        """Give pending notices ``grace`` seconds, then stop the sender."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), grace)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _through_fleet(self, fleet: Fleet, notice: Notice) -> Notice | None:
        """The notice as this node sends it in a fleet, or None when another node does."""
        k = (notice.event, notice.key)
        try:
            if notice.state == "firing":
                notify, nodes = await asyncio.to_thread(fleet.fire, notice.event, notice.key,
                                                        notice.since, notice.repeat)
                if not notify:
                    log.info("alert %s %s: notified by another node of the fleet", *k)
                    return None
                self._notified.add(k)
                if not notice.repeat and self._gather > 0:
                    await asyncio.sleep(self._gather)
                    nodes = await asyncio.to_thread(fleet.seen, notice.event, notice.key) or nodes
            else:
                last, nodes = await asyncio.to_thread(fleet.clear, notice.event, notice.key)
                self._notified.discard(k)
                if not last:
                    return None
        except StateUnavailable as exc:
            # Alone: an alert sent by two nodes beats one that nobody sends. A recovery only
            # from a node that announced the outage.
            log.warning("alerts: the fleet cannot be asked who notifies (%s); notifying alone", exc)
            if notice.state == "firing":
                self._notified.add(k)
            elif k not in self._notified:
                return None
            else:
                self._notified.discard(k)
            nodes = (fleet.node,)
        return dataclasses.replace(notice, nodes=tuple(nodes))

    async def _deliver(self, notice: Notice) -> None:
        if self._fleet is not None and notice.event in FLEET_EVENTS:
            fleet_notice = await self._through_fleet(self._fleet, notice)
            if fleet_notice is None:
                return
            notice = fleet_notice
        ok = False
        if self._cfg.webhook:
            try:
                await asyncio.wait_for(self._post(self._cfg.webhook, notice), HTTP_TIMEOUT)
                ok = True
            except Exception as exc:  # an alert channel must never take the daemon down
                log.warning("alert webhook %s failed: %s", _safe_url(self._cfg.webhook),
                            _reason(exc))
        if self._cfg.email and self._send_email is not None:
            try:
                await self._send_email(self._email(notice), self._cfg.email)
                ok = True
            except Exception as exc:  # same reason
                log.warning("alert email to %s failed: %s", self._cfg.email, _reason(exc))
        if ok:
            self.sent += 1

    def _email(self, notice: Notice) -> bytes:
        # lazy: the email package is ~2.5 MB per process, and only alert emails need it.
        from email.message import EmailMessage
        from email.policy import SMTP
        from email.utils import format_datetime, make_msgid

        assert self._cfg.email is not None
        msg = EmailMessage()
        word = "FIRING" if notice.state == "firing" else "RESOLVED"
        msg["From"] = f"relayd <relayd@{self._hostname}>"
        msg["To"] = self._cfg.email
        msg["Subject"] = f"[relayd {self._hostname}] {word}: {notice.event} {notice.key}"
        msg["Date"] = format_datetime(datetime.fromtimestamp(notice.at, UTC))
        msg["Message-ID"] = make_msgid(domain=self._hostname)
        msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to alerts
        body = [notice.message, "", f"event: {notice.event}", f"key: {notice.key}",
                f"state: {notice.state}", f"since: {_iso(notice.since)}", f"host: {self._hostname}"]
        if notice.nodes:
            body.append(f"nodes: {', '.join(notice.nodes)}")
        msg.set_content("\n".join(body) + "\n")
        return msg.as_bytes(policy=SMTP)

    async def _post(self, url: str, notice: Notice) -> None:
        parts = urlsplit(url)
        https = parts.scheme == "https"
        host = parts.hostname or ""
        port = parts.port or (443 if https else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        body = json.dumps(notice.payload(self._hostname)).encode()
        ctx = (self._ssl or ssl.create_default_context()) if https else None
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx,
                                                       server_hostname=host if https else None)
        try:
            netloc = parts.netloc.rsplit("@", 1)[-1]
            head = [f"POST {path} HTTP/1.1", f"Host: {netloc}", "User-Agent: relayd-alerts",
                    "Content-Type: application/json", f"Content-Length: {len(body)}",
                    "Connection: close"]
            if parts.username is not None:
                cred = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
                head.append("Authorization: Basic " + base64.b64encode(cred.encode()).decode())
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
            status_line = await reader.readline()
            fields = status_line.split()
            if len(fields) < 2 or not fields[1].isdigit():
                raise ConnectionError("no HTTP response")
            status = int(fields[1])
            if not 200 <= status < 300:
                raise ConnectionError(f"HTTP {status}")
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


def _safe_url(url: str) -> str:
    # Webhook URLs often carry a secret in the path or userinfo (Slack, Teams): log only
    # scheme and host.
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
