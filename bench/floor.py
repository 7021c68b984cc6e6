"""The memory floor under issue 15's RSS target: what two processes of the required stack hold
before relayd's own code or any message.

Issue 15 asks for relayd's two processes to stay at or under 64 MB of RSS together under the
100 KB policy load, while signing through ``cryptography`` and using both cores. This measures,
in fresh interpreters of the same Python:

- ``python`` doing nothing;
- the signing process's floor: asyncio, uvloop, one listening socket and one RSA-2048
  signature through ``cryptography`` (what any accepting process that signs must load);
- the delivery process's floor: asyncio, uvloop and aiosmtplib;
- relayd itself, idle, with the benchmark's policy configuration (bench/systems.py), as
  ``relayd run`` starts it: both processes.

Each row gives RSS, split into file-backed pages (libraries, counted again in each process
that maps them) and anonymous pages (the interpreter's heap), and PSS. Run:
``python bench/floor.py [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from postfix import free_port
from systems import Relayd, dkim_key, rollup_mb

# What each probe imports and does; it then prints its own /proc/self/smaps_rollup.
_REPORT = "import sys; sys.stdout.write(open('/proc/self/smaps_rollup').read())"
PROBES = {
    "python doing nothing": "pass",
    "signing floor: asyncio + uvloop + cryptography RSA-2048 sign + a listening socket": """
import asyncio, socket, uvloop
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
key = rsa.generate_private_key(65537, 2048)
key.sign(b"x", padding.PKCS1v15(), hashes.SHA256())
async def main():
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    server.close()
uvloop.run(main())
""",
    "delivery floor: asyncio + uvloop + aiosmtplib": """
import asyncio, uvloop, aiosmtplib
uvloop.run(asyncio.sleep(0))
""",
}


def probe(code: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", code + "\n" + _REPORT], check=True,
                         capture_output=True, text=True).stdout
    return rollup_mb(out)


def relayd_idle(workdir: Path) -> dict[str, dict[str, float]]:
    """Both processes of ``relayd run`` with the policy configuration, idle after start."""
    relayd = Relayd(workdir, free_port(), 20, policy_key=dkim_key(workdir / "dkim.pem"))
    relayd.start()
    try:
        deadline = time.monotonic() + 30
        while len(relayd.pids()) < 2:  # the delivery process starts after the banner
            if time.monotonic() > deadline:
                raise RuntimeError("relayd's delivery process did not start")
            time.sleep(0.05)
        time.sleep(1.0)  # let both finish their first scans (not readiness: a settled reading)
        names = ("accepting", "delivery")
        return {name: rollup_mb(Path(f"/proc/{pid}/smaps_rollup").read_text())
                for name, pid in zip(names, relayd.pids(), strict=True)}
    finally:
        relayd.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="also write the measurements here")
    args = p.parse_args()
    rows = {name: probe(code) for name, code in PROBES.items()}
    with tempfile.TemporaryDirectory(prefix="relayd-floor-") as tmp:
        idle = relayd_idle(Path(tmp))
    rows.update({f"relayd run, policy, idle: {k} process": v for k, v in idle.items()})
    print(f"{'':88s} {'RSS':>6} {'file':>6} {'anon':>6} {'PSS':>6}  (MB)")
    for name, r in rows.items():
        print(f"{name:88s} {r['rss']:6.1f} {r['file']:6.1f} {r['anon']:6.1f} {r['pss']:6.1f}")
    names = list(PROBES)
    floor = rows[names[1]]["rss"] + rows[names[2]]["rss"]
    pair = sum(v["rss"] for v in idle.values())
    print(f"\nthe required stack's two processes, no relayd code: {floor:.1f} MB RSS "
          f"({64 - floor:+.1f} MB to the 64 MB target)")
    print(f"relayd's two processes idle with the policy: {pair:.1f} MB RSS "
          f"(PSS {sum(v['pss'] for v in idle.values()):.1f})")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "floor_pair_rss": floor,
                                         "relayd_idle_pair_rss": pair}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
