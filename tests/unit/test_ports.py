"""The test suite's port allocator: ports outside the kernel's ephemeral range, never the
same twice, each bindable when handed out."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.support.ports import PortRange, free_port


def test_ports_are_below_the_ephemeral_range_distinct_and_bindable() -> None:
    floor = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(1024 < p < floor for p in ports)
    for port in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_in_use_is_skipped() -> None:
    first = free_port()
    with socket.socket() as held:
        held.bind(("127.0.0.1", first))
        held.listen()
        ports = PortRange(first, first + 3, first)
        assert first not in {ports.take() for _ in range(4)}
