"""Long fuzzing run (on demand, not in CI) with atheris (libFuzzer, coverage-guided) over the
four parsers that see untrusted input. The short hypothesis versions run in CI
(tests/unit/test_fuzz.py); this script reuses their oracles.

    pip install atheris          # a dev tool only, not a relayd dependency
    python bench/fuzz.py --runs 250000            # every target, one process each
    python bench/fuzz.py --target policy --runs 1000000

Targets and what counts as a failure (atheris stops and prints the input):
  data      the real RelaySMTP._read_data under random TCP chunking and buffer sizes:
            round trip (stuff -> read -> unstuff) differs, or bytes after the terminator lost
  policy    run_pipeline on corpus messages damaged by the fuzzer raises anything
  sendmail  parse_args raises anything but UsageError, or lets CR/LF/NUL through;
            read_message raises
  config    parse_config raises anything but ConfigError (seeded with the full example)

Without atheris, ``--plain`` runs the same oracles on random mutations (no coverage guidance).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGETS = ("data", "policy", "sendmail", "config")


def load_oracles(instrument: bool) -> dict[str, object]:
    """Import relayd (instrumented for coverage when atheris is used) and the CI oracles."""
    if instrument:
        import atheris

        with atheris.instrument_imports(include=["relayd"]):
            pass
    from tests.unit import test_config_injection as cfgtests
    from tests.unit import test_fuzz as oracles

    return {"oracles": oracles, "full": cfgtests.FULL}


class Targets:
    def __init__(self, instrument: bool) -> None:
        mods = load_oracles(instrument)
        self.o = mods["oracles"]
        self.full = mods["full"]
        self.loop = asyncio.new_event_loop()

    # Each target takes raw fuzzer bytes and raises on a real failure.
    def data(self, raw: bytes) -> None:
        if len(raw) < 4:
            return
        limit = (8, 16, 64, 65536)[raw[0] % 4]
        ncuts = raw[1] % 8
        cuts = list(raw[2:2 + ncuts])
        body = raw[2 + ncuts:]
        content, _, after = body.partition(b"\xfe\xfe")
        wire = self.o.stuff(content)
        got, too_big, rest = self.loop.run_until_complete(self.o.read_data(wire + after, cuts, limit, 0))
        expected = content if content.endswith(b"\r\n") else content + b"\r\n"
        if too_big or self.o.unstuff(got) != expected or rest != after:
            raise AssertionError(f"DATA reader: {content!r} {cuts} {limit} -> {got!r} {rest!r}")

    def policy(self, raw: bytes) -> None:
        if len(raw) < 3:
            return
        from relayd.model import Envelope, Message

        seed = self.o.SEEDS[raw[0] % len(self.o.SEEDS)]
        pos = int.from_bytes(raw[1:3], "big") % (len(seed) + 1)
        cut = raw[3] % 3 if len(raw) > 3 else 0
        patch = raw[4:]
        content = seed[:pos] + patch + (seed[pos + len(patch):] if cut == 0 else seed[pos:] if cut == 1 else b"")
        result = self.o.run_pipeline(self.o.POLICY, Message(Envelope("a@example.com", ("b@example.net",)), content),
                                     self.o.CTX)
        for out in result.outputs:
            if not isinstance(out.content, bytes) or not out.content:
                raise AssertionError("policy produced an empty message")

    def sendmail(self, raw: bytes) -> None:
        from relayd.commands.sendmail_args import UsageError, parse_args, read_message

        text = raw.decode("utf-8", "replace")
        argv = text.split("\x01")
        prog = ("sendmail", "mailq", "newaliases")[len(argv) % 3]
        try:
            opts = parse_args(argv, prog=prog)
        except UsageError:
            opts = None
        if opts is not None:
            for value in (opts.sender or "", opts.full_name or "", *opts.recipients):
                if any(c in value for c in "\r\n\x00"):
                    raise AssertionError(f"sendmail let a line break through: {argv!r}")
        read_message(self.o._Stream(raw), ignore_dots=bool(len(raw) % 2))

    def config(self, raw: bytes) -> None:
        from relayd.config.load import parse_config
        from relayd.errors import ConfigError

        with contextlib.suppress(ConfigError):
            parse_config(raw.decode("utf-8", "replace"), environ={})

    def seeds(self, target: str) -> list[bytes]:
        if target == "config":
            return [self.full.encode(), b"smarthosts: [{name: p, outbox: ./o}]\n"]
        if target == "policy":
            return [bytes([i, 0, 40, 1]) + b"=?\xe9so-8859-1?q?x?=" for i in range(len(self.o.SEEDS))]
        if target == "data":
            return [b"\x01\x03\x05\x07\x09line\r\n.dot\r\n\n.\r\nx\xfe\xfeQUIT\r\n"]
        return [b"-t\x01-i\x01-fa@b\x01user@example.com", b"-bs", b"--\x01a@x, b@y"]


def run_atheris(target: str, runs: int, workdir: Path) -> None:
    import atheris

    t = Targets(instrument=True)
    corpus = workdir / f"corpus-{target}"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(t.seeds(target)):
        (corpus / f"seed{i}").write_bytes(seed)
    fn = getattr(t, target)
    # Failing inputs go to the temp directory (printed by libFuzzer), never into the tree.
    crashes = Path(tempfile.gettempdir()) / "relayd-fuzz-crashes"
    crashes.mkdir(exist_ok=True)
    atheris.Setup([sys.argv[0], f"-runs={runs}", "-max_len=4096", "-print_final_stats=1",
                   f"-artifact_prefix={crashes}/{target}-", str(corpus)], fn)
    atheris.Fuzz()


def run_plain(target: str, runs: int, seed: int) -> None:
    t = Targets(instrument=False)
    rng = random.Random(seed)
    seeds = t.seeds(target)
    fn = getattr(t, target)
    started = time.monotonic()
    for _ in range(runs):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            op = rng.randrange(4)
            pos = rng.randrange(len(data) + 1)
            if op == 0:
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            elif op == 1:
                del data[pos:pos + rng.randint(1, 32)]
            elif op == 2 and data:
                data[pos % len(data)] = rng.randrange(256)
            else:
                data[pos:pos] = rng.choice([b"\r\n", b"\n", b".", b"\r\n.\r\n", b"--", b"=?", b":", b"\x00"])
        fn(bytes(data))
    print(f"Done {runs} runs in {time.monotonic() - started:.0f} second(s) (plain, {target})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=TARGETS)
    p.add_argument("--runs", type=int, default=250_000, help="inputs per target")
    p.add_argument("--plain", action="store_true", help="random mutations without atheris")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    if args.target:
        with tempfile.TemporaryDirectory(prefix="relayd-fuzz-") as tmp:
            if args.plain:
                run_plain(args.target, args.runs, args.seed)
            else:
                run_atheris(args.target, args.runs, Path(tmp))
        return 0
    # Every target in its own process (atheris exits the process when done), two at a time.
    procs = []
    for target in TARGETS:
        cmd = [sys.executable, __file__, "--target", target, "--runs", str(args.runs)]
        if args.plain:
            cmd.append("--plain")
        procs.append((target, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               env=dict(os.environ, PYTHONPATH=str(ROOT)))))
    failed = False
    for target, proc in procs:
        out = proc.communicate()[0].decode(errors="replace")
        done = [line for line in out.splitlines() if line.startswith("Done ") or "stat::" in line]
        print(f"== {target}: exit {proc.returncode}")
        print("\n".join(done[-6:]) if proc.returncode == 0 else out[-4000:])
        failed |= proc.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
