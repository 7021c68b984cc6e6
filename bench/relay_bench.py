"""relayd versus Postfix, side by side in one run: same sink, same load, same machine.

For each scenario (default: 1 KB and 100 KB bodies, 20 concurrent sessions, as fast as the
relay accepts; plus 1 KB offered at a fixed 500 msgs/s for acceptance latency) this starts a
fresh relayd (``relayd run`` with a temporary config: spool on the same disk, smarthost = the
sink, ``tls: none``) and then a fresh private Postfix (``bench/postfix.py``), sends a short
warm-up, resets the sink, runs ``bench/load.py``, and waits until the sink has counted every
accepted message. It prints per system:

- end-to-end msgs/s: messages counted at the sink / (last message at the sink - first
  transaction started), so a relay that accepts fast but delivers late gets no credit;
- acceptance msgs/s and acceptance latency p50 / p99 (MAIL to the 250 after the final dot);
- end-to-end delivery latency p50 / p99 (submission to the sink's 250);
- machine CPU per message (all processes, load generator and sink included; they do the
  same work for both systems, so the difference is the relay's);
- for relayd its peak RSS (VmHWM) and its own CPU per message;

and the ratio relayd / Postfix of the end-to-end rates. Absolute numbers depend on the
machine and on whatever else runs on it: compare the ratios, which are measured minutes
apart under the same conditions.

Usage: ``python bench/relay_bench.py`` (as root, for Postfix; ``--only relayd`` otherwise).
``--baseline DIR`` also runs the relayd of another checkout (``git worktree add DIR REV``) as
``relayd-base``, alternating with this one in every round: a before/after of a change measured
side by side in one run (``--only relayd --baseline DIR`` skips Postfix).
``--shared-state URL`` also runs the same relayd with ``shared_state`` (a fleet of one node on
that PostgreSQL database, password from ``$RELAYD_BENCH_PG_PASSWORD``, tables migrated first)
as ``relayd-shared``, alternating with ``relayd`` in every round: the cost of the shared state.
``--daily-cap N`` and ``--rate R`` set ``limits`` for every relayd (so that the cap and rate go
through the database in ``relayd-shared``).
``--set plain|policy`` picks the plain relay and/or the ``policy`` scenario (default both: relayd
with the sending policy and DKIM of ``bench/systems.py``, Postfix with OpenDKIM as a milter,
``bench/opendkim.py``; the policy set also has ``policy-ed25519-1KB`` and ``policy-dual-1KB``,
relayd signing Ed25519 alone or beside RSA against the same RSA peer); ``--load smtp-source`` uses Postfix's load generator instead of
``bench/load.py`` for the as-fast-as-accepted scenarios.
``--json FILE`` also writes every measurement; ``--profile DIR`` records relayd with py-spy
(``pip install py-spy``) into ``DIR/<scenario>.svg``/``.txt``; ``--trace DIR`` keeps each
message's acceptance latency of the offered-rate scenarios in ``DIR/<run>.txt`` and adds to
the JSON how the messages over 10 ms cluster in time (a tail of a few bursts after stalls,
docs/performance.md, or an even spread).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from machine import Pressure, probe  # noqa: E402
from opendkim import available as opendkim_available  # noqa: E402
from postfix import available, free_port  # noqa: E402
from systems import Postfix, Relayd, dkim_key, ed25519_key  # noqa: E402

SMTP_SOURCE = "/usr/sbin/smtp-source"


@dataclass(frozen=True)
class Scenario:
    name: str
    size: int
    count: int
    rate: float = 0.0
    policy: bool = False  # relayd with POLICY_CONFIG, Postfix with OpenDKIM (bench/systems.py)
    # relayd's dkim entries: rsa (the issue's), ed25519 or dual. Only rsa runs the peer; the
    # other two are compared with the same round's rsa peer (OpenDKIM signs RSA).
    dkim: str = "rsa"


@dataclass
class Measurement:
    system: str
    scenario: str
    accepted: int = 0
    delivered: int = 0
    rejected: int = 0
    errors: int = 0
    e2e_rate: float = 0.0
    accept_rate: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    e2e_p50_ms: float = 0.0
    e2e_p99_ms: float = 0.0
    cpu_ms_per_msg: float = 0.0  # whole machine
    relay_cpu_ms_per_msg: float = 0.0  # relayd's own process (0 for Postfix: many processes)
    peak_rss_mb: float = 0.0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# -- the sink ---------------------------------------------------------------------------------

class SinkClient:
    """Talks to bench/sink.py's private verbs."""

    def __init__(self, port: int) -> None:
        self.port = port

    def ask(self, verb: str) -> list[str]:
        with socket.create_connection(("127.0.0.1", self.port), 5) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(verb.encode() + b"\r\nQUIT\r\n")
            return f.readline().decode().split()[1:]

    def stat(self) -> tuple[int, float, float]:
        n, _bytes, first, last = self.ask("XSTAT")
        return int(n), float(first), float(last)

    def latency(self) -> tuple[float, float]:
        _n, p50, p99, _mx = self.ask("XLAT")
        return float(p50), float(p99)

    def reset(self) -> None:
        self.ask("XRESET")

    def wait_for(self, n: int, stall: float = 30.0) -> tuple[int, float]:
        """Wait until ``n`` messages were counted (or nothing arrives for ``stall`` seconds)."""
        last_n, last_change = -1, time.monotonic()
        while True:
            got, _first, last = self.stat()
            if got >= n:
                return got, last
            if got != last_n:
                last_n, last_change = got, time.monotonic()
            elif time.monotonic() - last_change > stall:
                return got, last
            time.sleep(0.05)


@contextlib.contextmanager
def sink_process() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, str(HERE / "sink.py"), "--latency"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("port "):
            raise RuntimeError("the sink did not start")
        yield int(line.split()[1])
    finally:
        proc.terminate()
        proc.wait(10)


# -- one measurement -----------------------------------------------------------------------------

def machine_cpu_seconds() -> float:
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    busy = sum(int(x) for i, x in enumerate(parts) if i not in (3, 4))  # minus idle, iowait
    return busy / os.sysconf("SC_CLK_TCK")


def run_load(port: int, sessions: int, size: int, count: int, rate: float,
             generator: str = "ours", trace: Path | None = None) -> dict[str, Any]:
    """Send ``count`` messages; ``generator`` is ``ours`` (bench/load.py: acceptance latency,
    offered rates) or ``smtp-source`` (Postfix's load generator, as its users measure: the
    rate only). An offered rate always uses ours."""
    if generator == "smtp-source" and not rate:
        return run_smtp_source(port, sessions, size, count)
    cmd = [sys.executable, str(HERE / "load.py"), "--port", str(port), "--sessions", str(sessions),
           "--size", str(size), "--count", str(count)]
    if rate:
        cmd += ["--rate", str(rate)]
    if trace is not None:
        cmd += ["--trace", str(trace)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def slow_clusters(trace: Path, over_ms: float = 10.0, gap_s: float = 0.1) -> dict[str, float]:
    """How the messages slower than ``over_ms`` in a load.py trace are grouped in time: a
    tail made of a few bursts (stalls and the backlog after them) or spread evenly."""
    slow = []
    for line in trace.read_text(encoding="ascii").splitlines():
        at, lat = (float(x) for x in line.split())
        if lat > over_ms:
            slow.append(at)
    slow.sort()
    clusters: list[list[float]] = []
    for at in slow:
        if clusters and at - clusters[-1][-1] < gap_s:
            clusters[-1].append(at)
        else:
            clusters.append([at])
    return {"slow_messages": len(slow), "slow_clusters": len(clusters),
            "largest_cluster": max((len(c) for c in clusters), default=0)}


def run_smtp_source(port: int, sessions: int, size: int, count: int) -> dict[str, Any]:
    """``smtp-source -d``: ``sessions`` connections, each reused for many messages, ``size``
    bytes of payload after its From/To/Date/Message-Id headers. It reports nothing but its
    exit status, so the rate is counted over its whole run."""
    cmd = [SMTP_SOURCE, "-d", "-s", str(sessions), "-l", str(size), "-m", str(count),
           "-f", "load@bench.example", "-t", "sink@sink.example", "-S", "bench message",
           f"127.0.0.1:{port}"]
    start = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    end = time.monotonic()
    ok = r.returncode == 0
    return {"accepted": count if ok else 0, "rejected": 0, "errors": 0 if ok else 1,
            "accept_rate": count / (end - start) if ok else 0.0, "start": start,
            "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0,
            "first_rejection": "" if ok else (r.stderr or r.stdout).strip()[:200]}


class MemorySampler:
    """Samples each relayd process's RSS and PSS every half second while the load runs: the
    largest sums seen, and each process's largest values."""

    def __init__(self, system: Relayd | Postfix) -> None:
        self.system = system
        self.samples: list[dict[str, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            sample = self.system.memory_now()
            if sample:
                self.samples.append(sample)
            if self._stop.wait(0.5):
                return

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind in ("rss", "pss"):
            out[f"{kind}_sum_max_mb"] = round(max(sum(p.get(kind, 0.0) for p in s.values())
                                                  for s in self.samples), 1)
            for proc in ("accepting", "delivery"):
                values = [s[proc].get(kind, 0.0) for s in self.samples if proc in s]
                if values:
                    out[f"{proc}_{kind}_max_mb"] = round(max(values), 1)
        return out


def measure(system: Relayd | Postfix, sink: SinkClient, sc: Scenario, sessions: int,
            warmup: int, generator: str = "ours", trace: Path | None = None) -> Measurement:
    m = Measurement(system=system.name, scenario=sc.name)
    m.extra["generator"] = "ours" if sc.rate else generator
    machine = probe(system.workdir)  # before the relay starts: nothing of the benchmark runs
    stalls = Pressure()
    system.start()
    try:
        if warmup:
            sink.reset()
            w = run_load(system.port, sessions, sc.size, warmup, 0.0, generator)
            sink.wait_for(int(w["accepted"]))
        sink.reset()
        system.start_profile()
        cpu0, own0 = machine_cpu_seconds(), system.cpu_seconds()
        main0, split0 = system.main_thread_cpu_seconds(), system.cpu_split()
        stalls.start()
        with MemorySampler(system) as mem:
            r = run_load(system.port, sessions, sc.size, sc.count, sc.rate, generator,
                         trace if sc.rate else None)
            delivered, last = sink.wait_for(int(r["accepted"]))
        cpu1, own1 = machine_cpu_seconds(), system.cpu_seconds()
        m.extra["machine"] = {**machine, **stalls.stop()}
        main1, split1 = system.main_thread_cpu_seconds(), system.cpu_split()
        system.stop_profile()
        m.accepted, m.rejected, m.errors = int(r["accepted"]), int(r["rejected"]), int(r["errors"])
        m.delivered = delivered
        m.accept_rate = float(r["accept_rate"])
        m.p50_ms, m.p99_ms, m.max_ms = float(r["p50_ms"]), float(r["p99_ms"]), float(r["max_ms"])
        m.e2e_rate = delivered / (last - float(r["start"])) if last > float(r["start"]) else 0.0
        m.e2e_p50_ms, m.e2e_p99_ms = sink.latency()
        if delivered:
            m.cpu_ms_per_msg = (cpu1 - cpu0) * 1000 / delivered
            m.relay_cpu_ms_per_msg = (own1 - own0) * 1000 / delivered
            m.extra["main_thread_cpu_ms_per_msg"] = round((main1 - main0) * 1000 / delivered, 3)
            for k in split0:  # thread exits between the two reads can make a delta negative
                m.extra[f"{k}_ms_per_msg"] = round(max(0.0, split1.get(k, 0.0) - split0[k])
                                                   * 1000 / delivered, 3)
            m.extra["main_thread_busy"] = round((main1 - main0) / (last - float(r["start"])), 3)
        m.peak_rss_mb = system.peak_rss_mb()
        if mem.samples:
            m.extra["memory"] = mem.report()
        if delivered < m.accepted:
            m.note = f"only {delivered} of {m.accepted} accepted messages reached the sink"
        if r.get("first_rejection"):
            m.note = (m.note + "; " if m.note else "") + f"first rejection: {r['first_rejection']}"
    finally:
        system.stop()
        # Write back what this run left dirty (its queue files, its journal) now, so the next
        # run's fsyncs do not queue behind it: a relayd latency run right after Postfix's
        # once measured p99 57.9 ms where relayd alone gives 2.8-4.4 ms. Both systems get it.
        os.sync()
    return m


def _per_process(relayd: Relayd, when: str) -> dict[str, float]:
    """Peak (VmHWM) and current (VmRSS) MB of each process: the accepting one (relayd run)
    first, then its delivery process (absent with RELAYD_SINGLE_PROCESS=1)."""
    out: dict[str, float] = {}
    for role, pid in zip(("accept", "deliver"), relayd.pids(), strict=False):
        status = relayd.proc_status(pid)
        for key, name in (("VmHWM", "peak"), ("VmRSS", "now")):
            out[f"{role}_rss_mb_{when}_{name}"] = round(int(status.get(key, "0 kB").split()[0]) / 1024, 1)
    return out


def measure_backlog(workdir: Path, count: int, sessions: int) -> dict[str, float]:
    """RSS of relayd holding ``count`` queued 1 KB messages: while they arrive with the
    smarthost down, and after a restart that finds them all in the spool."""
    dead = free_port()  # nothing listens there: every delivery attempt is refused
    relayd = Relayd(workdir, dead, 4)
    out: dict[str, float] = {"messages": count}
    relayd.start()
    try:
        t0 = time.monotonic()
        r = run_load(relayd.port, sessions, 1024, count, 0.0)
        out["accept_rate"] = round(float(r["accept_rate"]))
        out["load_seconds"] = round(time.monotonic() - t0, 1)
        out["queued"] = relayd.queue_left()
        out["rss_mb_while_accepting_peak"] = round(relayd.peak_rss_mb(), 1)
        out["rss_mb_after_accepting"] = round(relayd.rss_mb(), 1)
        out.update(_per_process(relayd, "after_accepting"))
    finally:
        relayd.stop()
    relayd = Relayd(workdir, dead, 4)  # same spool, fresh process
    t0 = time.monotonic()
    relayd.start()
    try:
        time.sleep(2.0)  # the queue manager loads the schedule right after start
        out["restart_seconds_to_banner"] = round(time.monotonic() - t0 - 2.0, 1)
        out["rss_mb_after_restart_peak"] = round(relayd.peak_rss_mb(), 1)
        out["rss_mb_after_restart"] = round(relayd.rss_mb(), 1)
        out.update(_per_process(relayd, "after_restart"))
    finally:
        relayd.stop()
    return out


# -- report --------------------------------------------------------------------------------------

def is_relayd(m: Measurement) -> bool:
    return m.system.startswith("relayd")


def report(results: list[Measurement], scenarios: list[Scenario]) -> str:
    lines = []
    hdr = (f"{'scenario':<20}{'system':<18}{'e2e/s':>8}{'acc/s':>8}{'p50ms':>8}{'p99ms':>8}"
           f"{'e2e p99':>9}{'cpu ms/msg':>11}{'own cpu':>9}{'RSS MB':>8}")
    lines.append(hdr)
    for sc in scenarios:
        for m in (x for x in results if x.scenario == sc.name):
            lines.append(f"{sc.name:<20}{m.system:<18}{m.e2e_rate:>8.0f}{m.accept_rate:>8.0f}"
                         f"{m.p50_ms:>8.1f}{m.p99_ms:>8.1f}{m.e2e_p99_ms:>9.1f}"
                         f"{m.cpu_ms_per_msg:>11.2f}"
                         f"{(f'{m.relay_cpu_ms_per_msg:.2f}' if is_relayd(m) else '-'):>9}"
                         f"{(f'{m.peak_rss_mb:.0f}' if is_relayd(m) else '-'):>8}"
                         + (f"  ({m.note})" if m.note else ""))
    lines.append("")
    for sc in scenarios:
        rel = [m for m in results if m.scenario == sc.name and m.system == "relayd"]
        peer_of = sc.name if sc.dkim == "rsa" else f"policy-{sc.name.rsplit('-', 1)[1]}"
        pfx = [m for m in results if m.scenario == peer_of and not is_relayd(m)]
        if rel and pfx and all(p.e2e_rate for p in pfx):
            ratios = [r.e2e_rate / p.e2e_rate for r, p in zip(rel, pfx, strict=False)]
            shown = ", ".join(f"{x:.2f}x" for x in ratios)
            lines.append(f"{sc.name}: relayd / {pfx[0].system} end to end = {shown}")
        base = [m for m in results if m.scenario == sc.name and m.system == "relayd-base"]
        if rel and base and all(b.e2e_rate for b in base):
            shown = ", ".join(f"{r.e2e_rate / b.e2e_rate:.2f}x"
                              for r, b in zip(rel, base, strict=False))
            lines.append(f"{sc.name}: relayd / relayd-base end to end = {shown}")
        shared = [m for m in results if m.scenario == sc.name and m.system == "relayd-shared"]
        if rel and shared and all(r.e2e_rate for r in rel):
            shown = ", ".join(f"{s.e2e_rate / r.e2e_rate:.2f}x"
                              for s, r in zip(shared, rel, strict=False))
            lines.append(f"{sc.name}: relayd-shared / relayd end to end = {shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--count-1k", type=int, default=10000)
    p.add_argument("--count-100k", type=int, default=4000)
    p.add_argument("--latency-rate", type=float, default=500.0,
                   help="msgs/s offered in the latency scenario (0: skip it)")
    p.add_argument("--latency-count", type=int, default=5000)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--rounds", type=int, default=1, help="repeat every pair (order alternates)")
    p.add_argument("--only", choices=("relayd", "postfix"))
    p.add_argument("--scenario", action="append", help="run only these scenarios (by name)")
    p.add_argument("--set", action="append", choices=("plain", "policy"), dest="sets",
                   help="plain relay and/or the policy scenario (default: both); policy "
                        "scenarios are named policy-1KB, policy-100KB, policy-1KB@500/s, and "
                        "policy-ed25519-1KB, policy-dual-1KB (relayd signing Ed25519 alone "
                        "or beside RSA; compared with the RSA peer)")
    p.add_argument("--load", choices=("ours", "smtp-source"), default="ours",
                   help="load generator for the as-fast-as-accepted scenarios (offered-rate "
                        "scenarios always use bench/load.py)")
    p.add_argument("--relayd-connections", type=int, default=20,
                   help="smarthost max_connections for relayd (Postfix's default concurrency is 20)")
    p.add_argument("--relayd-log-level", default="info",
                   help="relayd's logging.level (info logs 3 lines per message, like Postfix's 4-5)")
    p.add_argument("--backlog", type=int, default=0,
                   help="instead: queue this many 1 KB messages with the smarthost down and "
                        "report relayd's RSS (then after a restart)")
    p.add_argument("--workdir", type=Path, help="default: a temporary directory, removed afterwards")
    p.add_argument("--json", type=Path, help="also write the measurements here")
    p.add_argument("--profile", type=Path, help="py-spy relayd into this directory")
    p.add_argument("--trace", type=Path,
                   help="offered-rate scenarios: each message's latency into DIR/<run>.txt, "
                        "and how the ones over 10 ms cluster in time into the JSON")
    p.add_argument("--shared-state", metavar="URL",
                   help="also run relayd with shared_state on this database as relayd-shared")
    p.add_argument("--daily-cap", type=int, help="limits.daily_cap for every relayd")
    p.add_argument("--rate", help="limits.rate for every relayd (e.g. 100000/s)")
    p.add_argument("--baseline", type=Path,
                   help="also run the relayd of this checkout as relayd-base (before/after)")
    a = p.parse_args(argv)

    plain = [Scenario("1KB", 1024, a.count_1k), Scenario("100KB", 100 * 1024, a.count_100k)]
    if a.latency_rate:
        plain.append(Scenario(f"1KB@{a.latency_rate:g}/s", 1024, a.latency_count, a.latency_rate))
    scenarios = [s for s in plain if "plain" in (a.sets or ["plain"])]
    if "policy" in (a.sets or ["policy"]):
        scenarios += [Scenario(f"policy-{s.name}", s.size, s.count, s.rate, policy=True)
                      for s in plain]
        one_kb = plain[0]
        scenarios += [Scenario(f"policy-{kind}-{one_kb.name}", one_kb.size, one_kb.count,
                               policy=True, dkim=kind) for kind in ("ed25519", "dual")]
    if a.scenario:
        scenarios = [s for s in scenarios if s.name in a.scenario]
    systems = ["relayd", "postfix"] if a.only is None else [a.only]
    if a.baseline is not None:
        systems.insert(1, "relayd-base")
    if a.shared_state is not None:
        systems.insert(1, "relayd-shared")
    limits = "".join(f"  {k}: {v}\n" for k, v in (("daily_cap", a.daily_cap), ("rate", a.rate))
                     if v is not None)
    limits = f"limits:\n{limits}" if limits else ""
    if "postfix" in systems and (why := available()):
        print(f"Postfix cannot run here: {why}; use --only relayd", file=sys.stderr)
        return 2
    if "postfix" in systems and any(s.policy for s in scenarios) and (why := opendkim_available()):
        print(f"OpenDKIM cannot run here: {why}; use --only relayd", file=sys.stderr)
        return 2
    if a.load == "smtp-source" and not os.path.exists(SMTP_SOURCE):
        print(f"{SMTP_SOURCE} not found (apt-get install postfix)", file=sys.stderr)
        return 2
    if a.trace is not None:
        a.trace.mkdir(parents=True, exist_ok=True)
    base = a.workdir or Path(tempfile.mkdtemp(prefix="relayd-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)  # Postfix's unprivileged daemons must reach their queue below it
    if a.backlog:
        compile_bytecode()
        try:
            print(json.dumps(measure_backlog(base / "backlog", a.backlog, a.sessions), indent=1))
        finally:
            if a.workdir is None:
                shutil.rmtree(base, ignore_errors=True)
        return 0
    results: list[Measurement] = []
    compile_bytecode(*([a.baseline] if a.baseline is not None else []))
    key = dkim_key(base / "dkim.pem") if any(s.policy for s in scenarios) else None
    ed_key = (ed25519_key(base / "dkim-ed25519.pem")
              if any(s.dkim != "rsa" for s in scenarios) else None)
    print(f"# {os.cpu_count()} CPUs, {a.sessions} sessions, load {a.load}, work dir {base}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    try:
        with sink_process() as sink_port:
            sink = SinkClient(sink_port)
            for rnd in range(a.rounds):
                for sc in scenarios:
                    order = systems if rnd % 2 == 0 else systems[::-1]
                    for name in order:
                        if name == "postfix" and sc.dkim != "rsa":
                            continue  # compared with this round's policy peer (report())
                        wd = base / f"{name}-{sc.name.replace('/', '_')}-{rnd}"
                        wd.mkdir(parents=True, exist_ok=True)
                        tag = f"{name}-{sc.name.replace('/', '_')}-{rnd}"
                        pkey = key if sc.policy else None
                        system: Relayd | Postfix = (
                            Relayd(wd, sink_port, a.relayd_connections, a.profile, tag,
                                   a.relayd_log_level,
                                   tree=a.baseline if name == "relayd-base" else ROOT, name=name,
                                   policy_key=pkey, dkim=sc.dkim, ed25519_key=ed_key,
                                   extra_config=limits + (shared_config(a.shared_state)
                                                          if name == "relayd-shared" else ""))
                            if name != "postfix" else Postfix(wd, sink_port, dkim_key=pkey))
                        trace = a.trace / f"{tag}.txt" if a.trace is not None else None
                        m = measure(system, sink, sc, a.sessions, a.warmup, a.load, trace)
                        if trace is not None and trace.exists():
                            m.extra.update(slow_clusters(trace))
                        m.extra["load_average"] = round(os.getloadavg()[0], 2)
                        results.append(m)
                        print(f"{sc.name:<18} {m.system:<16} e2e {m.e2e_rate:7.0f}/s  accept "
                              f"{m.accept_rate:7.0f}/s  p50 {m.p50_ms:6.1f} ms  p99 {m.p99_ms:6.1f} ms"
                              + (f"  rss {m.peak_rss_mb:.0f} MB"
                                 f" (pss {m.extra.get('memory', {}).get('pss_sum_max_mb', 0):.0f})"
                                 f"  cpu {m.relay_cpu_ms_per_msg:.2f} ms/msg"
                                 f" (loop threads {m.extra.get('main_thread_cpu_ms_per_msg', 0):.2f},"
                                 f" busy {m.extra.get('main_thread_busy', 0):.0%})"
                                 if name != "postfix" else "")
                              + f"  load {m.extra['load_average']:.2f}"
                              + machine_line(m.extra.get("machine", {}))
                              + (f"  [{m.note}]" if m.note else ""), flush=True)
    finally:
        if a.workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    print()
    print(report(results, scenarios))
    if a.json:
        a.json.write_text(json.dumps([asdict(m) for m in results], indent=1))
    return 0


def machine_line(state: dict[str, float]) -> str:
    """The probe and the stalls of one run, for its progress line (bench/machine.py)."""
    if not state:
        return ""
    return (f"  | probe {state['cpu_probe_ms']:.0f} ms, fsync {state['fsync_p50_ms']:.2f}/"
            f"{state['fsync_max_ms']:.2f} ms, cpu wait {state.get('cpu_some_pct', 0):.0f}%,"
            f" io wait {state.get('io_some_pct', 0):.0f}%")


def shared_config(url: str) -> str:
    """relayd-shared's ``shared_state`` (a local database: no TLS)."""
    return (f"shared_state:\n  url: {url}\n  password_env: RELAYD_BENCH_PG_PASSWORD\n"
            "  sslmode: disable\n  node: bench\n")


def compile_bytecode(*trees: Path) -> None:
    """Byte-compile relayd and the environment's packages first, as installing them does.

    An installed relayd runs from .pyc files (pip compiles them; under the systemd unit's
    ProtectSystem=strict nothing else could write them). Run from a checkout with
    PYTHONDONTWRITEBYTECODE set, or with .pyc files older than their sources, every start
    compiled the sources again: +6 MB of RSS for the two processes (67 against 61 MB at
    1 KB) and a slower start, which is not what a sysadmin's relayd pays."""
    purelib = sysconfig.get_paths()["purelib"]
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "relayd"),
                    *(str(t / "relayd") for t in trees), purelib],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


if __name__ == "__main__":
    sys.exit(main())
