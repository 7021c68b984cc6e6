"""OpenDKIM's verifier (``opendkim-testmsg``, Debian opendkim-tools) as an independent check of
relayd's signatures, with no network.

``opendkim-testmsg`` has no option for a key: it looks the public key up in DNS. So it runs in
its own mount and network namespaces (``unshare -mn``, root), where ``/etc/resolv.conf`` is a
bind mount naming 127.0.0.1 and this module, run as a script inside the namespace, answers the
TXT queries from the records it was given on a UDP socket bound before the verifier starts.

``verify(message, records)`` returns (exit status, stderr): 0 and "" when every signature
verifies; ``dkim_eom(): Bad signature`` and the like otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

TESTMSG = "/usr/sbin/opendkim-testmsg"


def available() -> str | None:
    """None when the verifier can run here, else why not."""
    if not os.path.exists(TESTMSG):
        return f"{TESTMSG} not found (apt-get install opendkim-tools)"
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "opendkim-testmsg needs root and unshare(1) for its private DNS"
    return None


def verify(message: bytes, records: dict[str, str], timeout: float = 30) -> tuple[int, str]:
    """Run ``opendkim-testmsg`` on ``message`` with DNS answering ``records`` (name -> TXT)."""
    with tempfile.TemporaryDirectory(prefix="opendkim-") as tmp:
        (Path(tmp) / "records.json").write_text(json.dumps(records))
        (Path(tmp) / "message.eml").write_bytes(message)
        (Path(tmp) / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        r = subprocess.run(["unshare", "-mn", sys.executable, __file__, tmp],
                           capture_output=True, text=True, timeout=timeout, env=env)
        if r.returncode != 0 and "rc=" not in r.stdout:
            raise RuntimeError(f"the namespace did not start: {r.stderr}")
        rc = int(r.stdout.rsplit("rc=", 1)[1])
        return rc, r.stderr.strip()


def _answer(data: bytes, records: dict[str, str]) -> bytes:
    import dns.message  # dnspython comes with dkimpy, the other verifier the tests use
    import dns.rcode
    import dns.rdatatype
    import dns.rrset

    query = dns.message.from_wire(data)
    reply = dns.message.make_response(query)
    q = query.question[0]
    txt = records.get(str(q.name).lower().rstrip("."))
    if txt is None or q.rdtype != dns.rdatatype.TXT:
        reply.set_rcode(dns.rcode.NXDOMAIN)
    else:
        # A TXT string holds at most 255 bytes (RFC 1035 §3.3.14): a 2048-bit key needs several.
        chunks = " ".join(f'"{txt[i:i + 250]}"' for i in range(0, len(txt), 250))
        reply.answer.append(dns.rrset.from_text(q.name, 60, "IN", "TXT", chunks))
    wire: bytes = reply.to_wire()
    return wire


def _inside(tmp: Path) -> int:
    """In the fresh namespaces: loopback up, our resolv.conf, the DNS answers, the verifier."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["mount", "--bind", str(tmp / "resolv.conf"), "/etc/resolv.conf"], check=True)
    records = {k.lower().rstrip("."): v for k, v in json.loads((tmp / "records.json").read_text()).items()}
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 53))  # bound before the verifier starts: no race

    def serve() -> None:
        while True:
            data, peer = sock.recvfrom(4096)
            sock.sendto(_answer(data, records), peer)

    threading.Thread(target=serve, daemon=True).start()
    with open(tmp / "message.eml", "rb") as stdin:
        r = subprocess.run([TESTMSG], stdin=stdin, capture_output=True, timeout=20)
    sys.stderr.write(r.stderr.decode("utf-8", "replace"))
    print(f"rc={r.returncode}")
    return 0


if __name__ == "__main__":
    sys.exit(_inside(Path(sys.argv[1])))
