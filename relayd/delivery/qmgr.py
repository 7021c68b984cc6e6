"""The queue manager: decides what to deliver when, and turns delivery results into spool
transitions.

It keeps a compact in-memory schedule of queued IDs (relayd/delivery/schedule.py: priority first),
wakes on new mail or at the earliest due time instead of polling, and rescans the spool
slowly (plus `relayd queue` pokes quickly) to pick up messages it does not know yet. For
each due message it claims the file, tries the smarthosts in order (later ones are
fallbacks for the recipients the earlier ones deferred), logs one Postfix-shaped line per
recipient, and then completes, requeues with backoff, or fails the message: the attempt's
tally (relayd/delivery/records.py) goes through a pure function (relayd/delivery/transition.py)
and only carrying out its answer is done here.

Every attempt counts, whatever failed (SPEC "attempts"). A smarthost that fails as a whole
(refused, TLS, auth, 421, timeout, quota) is paused with backoff, so the messages behind it
wait without being tried and keep their count. A temporary reply about one message (a 4xx
after the final dot) defers only that message (relayd/delivery/health.py keeps the pauses and the
circuit breaker). `relayd queue retry` lifts the pauses, as `postqueue -f` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import TypeVar

from relayd import faults
from relayd.config.schema import DEFAULT_ROUTE, OnCap, ReplyAction, ReplyRule, Route, Smarthost, SpoolConfig
from relayd.control.metrics import Recorder
from relayd.delivery import logline
from relayd.delivery.backoff import backoff_delay
from relayd.delivery.health import Alerter, Health
from relayd.delivery.outcomes import apply_rules
from relayd.delivery.per_host import HostLimits, Wait, host_gate, obey
from relayd.delivery.ports import Gate, Pool
from relayd.delivery.records import Delays, GateVerdict, Tally, smarthost_failed
from relayd.delivery.schedule import Schedule
from relayd.delivery.transition import Complete, Fail, settle
from relayd.errors import StateUnavailable
from relayd.model import DeliveryResult, RecipientOutcome, Reply, State, Status
from relayd.routing.match import Facts, choose, header_from_domain, smarthosts_of
from relayd.spool.batching import Hops
from relayd.spool.records import Attempt, Claimed, Entry
from relayd.spool.store import Spool

log = logging.getLogger("relayd.qmgr")
_T = TypeVar("_T")

RESCAN_INTERVAL = 30.0
RESCAN_BATCH = 1000  # IDs per thread hop of a rescan (and per stretch on the event loop)
POKE_INTERVAL = 1.0
# While the fleet's shared state cannot be asked, a message that needs the cap is tried again
# this often: it resumes within a second or two of the database coming back.
STATE_RETRY = 1.0
# A disagreement this large between the wall clock and the monotonic clock over one loop tick
# is a clock jump (NTP step, VM resume, operator), not elapsed time.
CLOCK_JUMP = 60.0


@dataclass(frozen=True, slots=True)
class Plan:
    """Where one attempt sends a message: its route (``label`` None without ``routes``) and
    the smarthosts in order."""

    label: str | None
    route: Route | None
    hosts: tuple[Smarthost, ...]


@dataclass(frozen=True)
class QmgrStats:
    scheduled: int
    in_flight: int
    paused: tuple[str, ...]


class QueueManager:
    """Schedules and performs deliveries for one spool."""

    def __init__(self, spool: Spool, spool_cfg: SpoolConfig, smarthosts: Sequence[Smarthost],
                 pool_factory: Callable[[Smarthost], Pool], *, executor: Executor | None = None,
                 clock: Callable[[], float] = time.time, gate: Gate | None = None,
                 metrics: Recorder | None = None, alerts: Alerter | None = None,
                 host_limits: HostLimits | None = None,
                 on_clock_jump: Callable[[float, float], None] | None = None) -> None:
        self.spool = spool
        self.cfg = spool_cfg
        self.clock = clock
        self.gate = gate
        self.metrics = metrics
        self.alerts = alerts
        self._executor = executor
        self._hops = Hops(executor)
        self._pool_factory = pool_factory
        self._smarthosts: tuple[Smarthost, ...] = tuple(smarthosts)
        self._pools: dict[str, Pool] = {}
        self._health = Health(spool_cfg.retry, self._now, metrics=metrics, alerts=alerts)
        self._schedule = Schedule()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._retry_asked: set[str] = set()  # `queue retry` while in flight: again right after
        self._wake = asyncio.Event()
        self._stopping = False
        self._max_inflight = max(4, 2 * sum(s.max_connections for s in self._smarthosts))
        self._slots = asyncio.Semaphore(self._max_inflight)
        self._retired: list[Pool] = []
        self._routes: tuple[Route, ...] = ()
        self._reply_rules: tuple[ReplyRule, ...] = ()
        self._host_limits = host_limits
        self._priority_exempt = True  # limits.priority_exempt, for the smarthosts' own limits
        self._clock_seen = (clock(), time.monotonic())
        self._clock_skew = 0.0  # sum of observed wall-clock jumps (positive: forward)
        self._on_clock_jump = on_clock_jump  # (jump, now): the caps follow it too

    # -- blocking work off the loop --------------------------------------------------------
    async def _io(self, fn: Callable[..., _T], *args: object) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    # -- schedule --------------------------------------------------------------------------
    def enqueue(self, qid: str, due: float | None = None, priority: bool = False) -> None:
        """Make ``qid`` known to the scheduler (new mail, or found by a rescan)."""
        if qid in self._inflight:
            return  # a rescan found a message that is being delivered right now
        self._push(qid, self._now() if due is None else due, priority)

    def _push(self, qid: str, when: float, priority: bool) -> None:
        if self._schedule.push(qid, when, priority):
            self._wake.set()

    def forget(self, qid: str) -> None:
        self._schedule.forget(qid)

    def _hosts_available_at(self, now: float) -> float:
        """When at least one smarthost is not paused (now, if one is available)."""
        return self._health.available_at((s.name for s in self._smarthosts), now)

    def statistics(self) -> QmgrStats:
        now = self._now()
        return QmgrStats(scheduled=len(self._schedule), in_flight=len(self._inflight),
                         paused=self._health.paused(now))

    # -- configuration reload ----------------------------------------------------------------
    def update_smarthosts(self, smarthosts: Sequence[Smarthost], spool_cfg: SpoolConfig) -> None:
        """Apply reloaded settings to every later attempt, including queued retries."""
        old = {s.name: s for s in self._smarthosts}
        self._smarthosts = tuple(smarthosts)
        self.cfg = spool_cfg
        self._health.retry = spool_cfg.retry
        for s in self._smarthosts:
            if old.get(s.name) != s:
                pool = self._pools.pop(s.name, None)
                if pool is not None:
                    self._retired.append(pool)
                # New settings (e.g. corrected credentials): try the smarthost again now.
                self._health.forget(s.name)
        for name in set(old) - {s.name for s in self._smarthosts}:
            pool = self._pools.pop(name, None)
            if pool is not None:
                self._retired.append(pool)
            self._health.forget(name)
        self._wake.set()

    def update_routes(self, routes: Sequence[Route], reply_rules: Sequence[ReplyRule], *,
                      priority_exempt: bool = True) -> None:
        """``routes``, ``reply_rules`` and the smarthosts' own limits for every later attempt:
        queued mail keeps only its route's name, so a changed route applies at its next
        attempt. Priority mail with ``priority_exempt`` never waits for a smarthost's limits."""
        self._routes = tuple(routes)
        self._reply_rules = tuple(reply_rules)
        self._priority_exempt = priority_exempt
        if self._host_limits is not None:
            self._host_limits.apply(self._smarthosts)

    def _plan(self, entry: Entry, content: bytes) -> Plan:
        """The route of ``entry`` as configured now (relayd/routing/match.py)."""
        if not self._routes:
            return Plan(None, None, self._smarthosts)
        name = entry.envelope.route or DEFAULT_ROUTE
        if name == DEFAULT_ROUTE:
            return Plan(DEFAULT_ROUTE, None, self._smarthosts)
        route = next((r for r in self._routes if r.name == name), None)
        if route is None:
            # Removed or renamed by a reload: match again, on what is stored (the sender as
            # rewritten, the From header, the first pending recipient's domain).
            facts = Facts(entry.envelope.mail_from, header_from_domain(content),
                          user=entry.envelope.user or None, priority=entry.envelope.priority)
            choice = choose(self._routes, facts, entry.pending[0] if entry.pending else "")
            log.info("%s: route %s is no longer configured; %s", entry.id, name, choice.why)
            name, route = choice.name, choice.route
        return Plan(name, route, smarthosts_of(self._smarthosts, route))

    def pool_for(self, sh: Smarthost) -> Pool:
        """The (shared) connection pool of ``sh``."""
        return self._pool(sh)

    def _pool(self, sh: Smarthost) -> Pool:
        pool = self._pools.get(sh.name)
        if pool is None:
            pool = self._pools[sh.name] = self._pool_factory(sh)
        return pool

    # -- main loop -----------------------------------------------------------------------------
    async def load(self) -> int:
        """Fill the schedule from the spool (start-up and slow rescans); returns the number
        of queued messages seen. Only the files of messages not scheduled yet are read, a
        batch at a time: a backlog costs neither a list of every ID nor a read of every
        file on each rescan."""
        seen = 0
        scan = self.spool.scan_queued()
        try:
            while batch := await self._io(scan.next_batch, RESCAN_BATCH):
                seen += len(batch)
                unknown = [q for q in batch if q not in self._schedule and q not in self._inflight]
                if not unknown:
                    continue
                rows = await self._io(self.spool.schedule_rows, unknown)
                now = self._now()
                # No stored retry time lies further out than the longest backoff, even when
                # the clock was set back while relayd was not running.
                latest = now + self.cfg.retry.max_interval
                for qid, next_attempt, priority in rows:
                    if qid not in self._schedule and qid not in self._inflight:
                        self.enqueue(qid, now if next_attempt is None else min(next_attempt, latest),
                                     priority)
        finally:
            await self._io(scan.close)
        return seen

    async def _apply_pokes(self) -> None:
        retried = False
        for poke in await self._io(self.spool.take_pokes):
            qid = poke.queue_id
            if qid in self._inflight:
                if poke.retry:
                    self._retry_asked.add(qid)
                    retried = True
                continue
            try:
                entry = await self._io(self.spool.get, qid)
            except (ValueError, KeyError, OSError) as exc:  # gone, or unreadable now (a rescan looks)
                self.forget(qid)
                if not isinstance(exc, OSError):
                    # Damaged, or a newer relayd's format (e.g. after `queue retry`): a queued
                    # one is set aside by the scan's own read now, not at the next rescan.
                    for row_id, next_attempt, priority in await self._io(self.spool.schedule_rows, [qid]):
                        self.enqueue(row_id, next_attempt or self._now(), priority)
                continue
            if entry.state is State.QUEUED:
                self.enqueue(qid, entry.next_attempt or self._now(), entry.envelope.priority)
                retried = retried or poke.retry
            else:
                self.forget(qid)
        if retried:
            self.lift_pauses()

    def lift_pauses(self) -> None:
        """`relayd queue retry`: try the paused smarthosts again now (``postqueue -f``)."""
        self._health.lift(self._smarthosts)
        for sh in self._smarthosts:
            pool = self._pools.get(sh.name)
            if pool is not None:
                pool.retry_now()
        self._wake.set()

    async def run(self) -> None:
        """Deliver until cancelled or ``stop()``; in-flight deliveries finish first."""
        await self.load()
        last_scan = last_poke = time.monotonic()
        try:
            while not self._stopping:
                now = self._now()
                tick = time.monotonic()
                if tick - last_poke >= POKE_INTERVAL:
                    await self._apply_pokes()
                    last_poke = tick
                if tick - last_scan >= RESCAN_INTERVAL:
                    await self.load()
                    last_scan = tick
                await self._retire_pools()
                available = self._hosts_available_at(now)
                qid = self._schedule.pop_due(now) if available <= now else None
                if qid is None:
                    due = self._schedule.next_due()
                    wake_at = min(x for x in (due if due is not None else now + POKE_INTERVAL,
                                              now + POKE_INTERVAL) if x is not None)
                    if available > now:
                        wake_at = min(max(available, due or available), now + POKE_INTERVAL)
                    await self._sleep_until(wake_at)
                    continue
                await self._slots.acquire()
                task = asyncio.create_task(self._deliver_one(qid), name=f"deliver-{qid}")
                self._inflight[qid] = task
                task.add_done_callback(functools.partial(self._done, qid))
        finally:
            await self._drain()

    def now(self) -> float:
        """The wall clock as the queue manager reads it: a jump is noticed (and followed) first."""
        return self._now()

    def _now(self) -> float:
        """The wall clock now; every reading goes through here. A jump (an NTP step, a VM
        resumed, an operator) shifts every scheduled time and smarthost pause by the same
        amount, so retry intervals keep their real length, and is remembered so that expiry
        counts real time, not the jump."""
        now, mono = self.clock(), time.monotonic()
        last_wall, last_mono = self._clock_seen
        self._clock_seen = (now, mono)
        jump = (now - last_wall) - (mono - last_mono)
        if abs(jump) < CLOCK_JUMP:
            return now
        self._clock_skew += jump
        log.warning("the wall clock jumped %+.0fs; retry times and daily caps follow it, "
                    "expiry ignores it", jump)
        self._schedule.shift(jump)
        self._health.shift(jump)
        if self._on_clock_jump is not None:
            self._on_clock_jump(jump, now)
        return now

    def _done(self, qid: str, task: asyncio.Task[None]) -> None:
        self._inflight.pop(qid, None)
        self._retry_asked.discard(qid)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: delivery task crashed: %r", qid, task.exception())

    async def _sleep_until(self, when: float) -> None:
        self._wake.clear()
        delay = max(0.0, when - self._now())
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def _drain(self, grace: float = 30.0) -> None:
        tasks = list(self._inflight.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending)
        for pool in list(self._pools.values()) + self._retired:
            with contextlib.suppress(Exception):
                await pool.aclose()
        self._pools.clear()
        self._retired.clear()
        await self._io(self.spool.flush_completions)

    async def _retire_pools(self) -> None:
        # Pools replaced by a reload close once their in-flight deliveries are done.
        while self._retired:
            pool = self._retired.pop()
            with contextlib.suppress(Exception):
                await pool.aclose()

    # -- one message ------------------------------------------------------------------------------
    def _claim(self, qid: str, now: float) -> tuple[Claimed | None, GateVerdict | None]:
        """Worker thread: claim the message and, in the same hop, ask the gate about it."""
        claimed = self.spool.claim(qid)
        if claimed is None or self.gate is None:
            return claimed, None
        try:
            return claimed, self._gate_check(claimed.entry, claimed.entry.pending, now)
        except Exception:  # asked again in _attempt, where an error defers the message
            return claimed, None

    async def _deliver_one(self, qid: str) -> None:
        try:
            claimed, verdict = await self._hops.call(self._claim, qid, self._now())
        except OSError as exc:
            # The spool cannot change right now (read-only, I/O error): nothing was claimed.
            # Keep the message scheduled; dropped here it would wait for the next slow rescan.
            delay = backoff_delay(1, self.cfg.retry)
            log.error("%s: cannot claim for delivery (%s); trying again in %.0fs", qid,
                      exc.strerror or exc, delay)
            self._push(qid, self._now() + delay, False)
            return
        if claimed is None:
            return  # held, deleted or retried by an operator meanwhile
        entry = claimed.entry
        try:
            await self._attempt(claimed, verdict)
        except asyncio.CancelledError:
            # Shutdown: give the message back untouched so the next start delivers it.
            with contextlib.suppress(OSError):
                self.spool.requeue(entry.id, entry.meta)
            raise
        except Exception as exc:
            # Mailman's shunt principle: an unexpected error defers the message, never drops it.
            log.exception("%s: unexpected error during delivery; deferring", qid)
            now = self._now()
            meta = replace(entry.meta, attempts=entry.attempts + 1, last_error=f"local error: {exc!r}",
                           next_attempt=now + backoff_delay(entry.attempts + 1, self.cfg.retry))
            try:
                await self._io(self.spool.requeue, entry.id, meta)
            finally:  # requeue moves the file back even when the metadata write failed
                delay = (meta.next_attempt or now) - now
                self._push(entry.id, self._now() + delay, entry.envelope.priority)

    async def _attempt(self, claimed: Claimed, verdict: GateVerdict | None) -> None:
        entry = claimed.entry
        now = self._now()
        if self.gate is None:
            verdict = GateVerdict(entry.pending)
        else:
            # The do-not-email list and the daily cap live in SQLite: _claim read them off the
            # loop, in the claim's own thread hop.
            if verdict is None:
                verdict = await self._io(self._gate_check, entry, entry.pending, now)
            if verdict.wait > 0:
                # Over the daily cap (or a user's limit, or the shared cap cannot be asked).
                await self._wait_in_spool(entry, verdict, now)
                if self.alerts and verdict.reason is None:  # the others alert by themselves
                    self.alerts.fire("daily_cap_reached", "daily_cap",
                                     "limits.daily_cap reached: mail waits in the queue")
                return
            if verdict.allowed:
                try:
                    await self.gate.wait_rate(entry, len(verdict.allowed))
                except StateUnavailable as exc:  # the fleet's rate cannot be asked
                    await asyncio.shield(self._gate_settle(entry, 0))
                    await self._wait_in_spool(entry, replace(
                        verdict, wait=STATE_RETRY,
                        reason=f"waiting for the shared state (limits.rate): {exc}"), now)
                    return
                except BaseException:
                    await asyncio.shield(self._gate_settle(entry, 0))
                    raise
        # What was delivered so far, kept outside the tally so that the gate counts it even
        # when a shutdown cuts the attempt short.
        sent: list[str] = []
        plan = self._plan(entry, claimed.content)
        try:
            tally = await self._try_smarthosts(entry, claimed.content, verdict, sent, plan)
            await self._finish(entry, tally, plan)
        finally:
            if self.gate is not None:
                # Shielded: a shutdown must not lose the count of what was already delivered.
                await asyncio.shield(self._gate_settle(entry, len(sent)))

    async def _wait_in_spool(self, entry: Entry, verdict: GateVerdict, now: float) -> None:
        """The message waits in the spool for ``verdict.wait``; no attempt is spent."""
        meta = replace(entry.meta, pending=verdict.allowed, next_attempt=now + verdict.wait,
                       last_error=verdict.reason or "waiting for limits.daily_cap to free up")
        await self._io(self.spool.requeue, entry.id, meta)
        self._push(entry.id, self._now() + verdict.wait, entry.envelope.priority)

    def _gate_check(self, entry: Entry, pending: tuple[str, ...], now: float) -> GateVerdict:
        """Worker thread: the gate's verdict on ``pending`` (see GateVerdict)."""
        assert self.gate is not None
        allowed, suppressed = self.gate.recheck(entry, pending)
        try:
            wait = self.gate.hold_for(entry, len(allowed), now) if allowed else 0.0
        except StateUnavailable as exc:
            return GateVerdict(allowed, suppressed, STATE_RETRY,
                               f"waiting for the shared state (limits.daily_cap): {exc}")
        reason = self.gate.hold_reason(entry) if wait > 0 else None
        return GateVerdict(allowed, suppressed, wait, reason)

    def _gate_settle(self, entry: Entry, count: int) -> asyncio.Future[None]:
        """Count ``count`` delivered recipients against the cap, in a worker thread (SQLite)."""
        assert self.gate is not None
        loop = asyncio.get_running_loop()
        if not self.gate.counts_deliveries():
            self.gate.delivered(entry, count, self._now())  # in memory only
            done: asyncio.Future[None] = loop.create_future()
            done.set_result(None)
            return done
        return loop.run_in_executor(
            self._executor, self.gate.delivered, entry, count, self._now())

    async def _try_smarthosts(self, entry: Entry, content: bytes, verdict: GateVerdict,
                              sent: list[str], plan: Plan) -> Tally:
        """Offer the allowed recipients to the smarthosts in order (each later one a fallback
        for what the earlier ones deferred), logging each sent or failed recipient at once;
        the tally of the attempt. ``sent`` collects the delivered recipients as they go."""
        now = self._now()
        suppressed: list[Attempt] = []
        for rcpt in verdict.suppressed:
            listed = Reply(250, "2.0.0 on the do-not-email list")
            self._log(entry, RecipientOutcome(rcpt, Status.SUPPRESSED, listed, "2.0.0"), "none",
                      entry.attempts + 1, route=plan.label)
            suppressed.append(Attempt(now, rcpt, Status.SUPPRESSED, "none", "on the do-not-email list"))
            if self.metrics:
                self.metrics.suppressed()
        tally = Tally(verdict.allowed, history=tuple(suppressed), last_error=entry.last_error)
        limits = self._host_limits
        for sh in plan.hosts:
            if not tally.remaining:
                break
            if self._health.of(sh.name).paused_until > self._now():
                continue
            granted = 0
            if (limits is not None and limits.limits(sh.name)
                    and not (entry.envelope.priority and self._priority_exempt)):
                gate = host_gate(limits, sh, len(tally.remaining), self._now())
                if isinstance(gate, Wait):  # at its cap or rate: next smarthost, or wait
                    log.info("%s: %s (route %s, on_cap %s)", entry.id, gate.why, plan.label,
                             plan.route.on_cap.value if plan.route else OnCap.WAIT.value)
                    if plan.route is not None and plan.route.on_cap is OnCap.NEXT:
                        tally = replace(tally, last_error=gate.why)
                        continue
                    return replace(tally, wait_until=gate.until, last_error=gate.why)
                granted, pause = gate
                if pause > 0:
                    await asyncio.sleep(pause)
            call_start = self._now()
            result: DeliveryResult | None = None
            try:
                result = await self._pool(sh).deliver(entry.id, content, entry.envelope.mail_from,
                                                       tally.remaining, smtputf8=entry.envelope.smtputf8)
            finally:
                done = len(result.delivered) if result is not None else 0
                if limits is not None and (granted or done) and limits.limits(sh.name):
                    # The reservation back and the delivered counted in one step, or another
                    # delivery could take the room in between and overshoot the cap.
                    await asyncio.shield(self._io(limits.settle, sh.name, granted, done, self._now()))
            faults.crash_point("after-upstream-250")
            # The operator's reply rules, then the shipped provider rules (relayd/routing/rules.py).
            result, ruled = apply_rules(result, self._reply_rules)
            delays = Delays(max(0.0, now - entry.created), max(0.0, call_start - now) + result.wait_seconds,
                            result.setup_seconds, result.transfer_seconds)
            if ruled is None or ruled.action is ReplyAction.FAIL:
                self._health.note(sh, result, entry.id)
            at = self._now()
            tally = tally.add(result, delays, at)
            if ruled is not None:
                tally = obey(ruled, sh, tally, at, self._health, limits, self.cfg.retry.initial)
            if smarthost_failed(result):
                if self.metrics:
                    for _ in result.outcomes:
                        self.metrics.delivery(sh.name, Status.DEFERRED, route=plan.label)
                continue
            sent.extend(result.delivered)
            for o in self._report(entry, sh, result, delays, at, plan.label):
                if self.gate is not None:
                    await self._io(self.gate.hard_bounce, o.recipient, o.reply)
        return tally

    def _report(self, entry: Entry, sh: Smarthost, result: DeliveryResult, delays: Delays,
                at: float, route: str | None) -> list[RecipientOutcome]:
        """Log and count the outcomes of a smarthost's transaction (the deferred recipients
        are logged by _finish, with the time of their next attempt); the failed ones, for the
        hard-bounce check."""
        failed = []
        for o in result.outcomes:
            if o.status is Status.SENT or o.status is Status.FAILED:
                self._log(entry, o, result.relay, entry.attempts + 1, delays=delays, route=route)
                if o.status is Status.FAILED:
                    failed.append(o)
            if self.metrics:
                self.metrics.delivery(sh.name, o.status,
                                      at - entry.created if o.status is Status.SENT else None,
                                      route=route)
        return failed

    async def _finish(self, entry: Entry, tally: Tally, plan: Plan) -> None:
        """Decide the spool transition (relayd/delivery/transition.py) and carry it out."""
        now = self._now()
        available = self._health.available_at((s.name for s in plan.hosts), now)
        transition = settle(entry, tally, now=now, retry=self.cfg.retry, max_age=self.cfg.max_age,
                            hosts_available_at=available, clock_skew=self._clock_skew,
                            route=plan.label)
        if isinstance(transition, Complete):
            self.spool.complete_later(entry.id)
            for line in transition.lines:
                log.info("%s", line)
            return
        for line in transition.lines:
            log.info("%s", line)
        if isinstance(transition, Fail):
            await self._io(self.spool.fail, entry.id, transition.meta)
            self._message_failed(entry, transition.reason)
            return
        asked = entry.id in self._retry_asked  # the operator's `queue retry` came mid-attempt
        if asked:
            transition = replace(transition, meta=replace(transition.meta, next_attempt=now), due=now)
        await self._io(self.spool.requeue, entry.id, transition.meta)
        # Relative to a fresh reading: a wall-clock jump noticed while the spool was written
        # shifted everything already scheduled, and must not strand this one.
        self._push(entry.id, self._now() + (transition.due - now), entry.envelope.priority)
        if asked:
            self.lift_pauses()  # this attempt's fault may have paused the smarthost again

    # -- bookkeeping ----------------------------------------------------------------------------
    def _message_failed(self, entry: Entry, reason: str) -> None:
        if self.alerts:
            self.alerts.fire("message_failed", entry.id, f"message {entry.id} failed: {reason}")

    def _log(self, entry: Entry, o: RecipientOutcome, relay: str, attempts: int, *,
             delays: Delays | None = None, route: str | None = None) -> None:
        log.info("%s", logline.outcome_line(entry.id, entry.created, o, relay, attempts, self._now(),
                                            delays=delays, route=route))
