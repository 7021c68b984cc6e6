"""Random cases for relayd/_scan.c, run against a given build of it (``python -m
tests.support.scan_cases SO_PATH COUNT``): every function agrees with its Python twin in
relayd/bytescan.py. test_scan_sanitizers.py runs it on an ASan + UBSan build."""

from __future__ import annotations

import importlib.util
import random
import sys

from relayd import bytescan


def main(path: str, count: int) -> None:
    spec = importlib.util.spec_from_file_location("relayd._scan", path)
    assert spec is not None and spec.loader is not None
    scan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scan)
    rnd = random.Random(7)
    alphabet = b"\r\n.a "
    for _ in range(count):
        size = rnd.choice([0, 1, 2, 3, 5, 8, 40, 300, 5000])
        if size < 400:
            data = bytes(rnd.choice(alphabet) for _ in range(size))
        else:
            data = b"line.\r\n.x\r\n" * (size // 11)
            if rnd.random() < 0.5:  # a line of about 998 octets, for has_long_line
                at = rnd.randrange(len(data))
                data = data[:at] + b"a" * rnd.randint(995, 1001) + rnd.choice([b"", b"\r"]) + data[at:]
        rest = bytes(rnd.choice(alphabet) for _ in range(rnd.randint(0, 4)))
        start = rnd.randint(0, size + 2)
        expected = data.find(b"\n" + rest, start)
        assert scan.find_line(data, rest, start) == expected, (data, rest, start)
        assert scan.find_line(bytearray(data), rest, start) == expected, (data, rest, start)
        assert scan.line_ends_ok(data) == bytescan.py_line_ends_ok(data), data
        limit = rnd.choice([0, 1, 2, 3, 10, 998])
        assert scan.has_long_line(data, limit) == bytescan.py_has_long_line(data, limit), data
        assert scan.stuff(data) == bytescan.py_stuff(data), data
        assert scan.unstuff(data) == bytescan.py_unstuff(data), data
    print(f"ok {count}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
