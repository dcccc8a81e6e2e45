"""Datagrams the kernel drops because the daemon did not read them in time
(its receive buffer was full) are counted: peerd.shell.udp.kernel_drops reads
them from /proc/net/udp, and the runner shows them as
peerd_drops_total{layer="udp",reason="rcvbuf"}."""

from __future__ import annotations

import collections
import os
import socket

import pytest

from peerd.shell.metrics import render
from peerd.shell.udp import KernelDrops, kernel_drops

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/net/udp"), reason="needs Linux's /proc/net/udp"
)


def test_a_full_receive_buffer_shows_as_kernel_drops() -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        rx.bind(("127.0.0.1", 0))
        assert kernel_drops(rx) == 0
        assert dict(KernelDrops(rx)) == {"rcvbuf": 0}
        dst = rx.getsockname()
        for _ in range(400):  # nobody reads: the buffer fills, the rest drop
            tx.sendto(b"x" * 1000, dst)
        dropped = kernel_drops(rx)
        assert dropped is not None and dropped > 0
        counters = collections.Counter({f"udp_drop_{k}": v for k, v in KernelDrops(rx).items()})
        text = render({"counters": dict(counters)})
        assert f'peerd_drops_total{{layer="udp",reason="rcvbuf"}} {dropped}' in text
    finally:
        rx.close()
        tx.close()


def test_no_table_no_count(tmp_path: object) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        assert kernel_drops(s, proc_net="/nonexistent") is None
