"""A join through a daemon whose TCP port is under a connection flood
(issue 16): real daemons on loopback, the attacker's connections from two
other loopback addresses.

On aaa7b78 the listener had 64 slots for the whole world: two hosts that
keep reopening connections which announce a small frame and never send it
held all of them (each for 10 s), and a new node could not join through that
daemon at all ("no seed answered"). Now one source address holds at most 8
slots before it authenticates, for at most the hello deadline.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence

import pytest

from .harness import Cluster, fresh_host, wait_converged, wait_until

pytestmark = pytest.mark.proc


class SlowLoris:
    """Keeps up to ``per_source`` connections from each of ``sources`` open
    to ``target``: each announces a ``announce``-byte frame, sends nothing
    more and waits for the daemon to close it, then reopens ``reopen_s``
    later. Threads; bounded: :meth:`stop` ends them within a second."""

    def __init__(
        self,
        target: tuple[str, int],
        sources: Sequence[str],
        per_source: int,
        *,
        announce: int = 4000,
        reopen_s: float = 0.2,
    ) -> None:
        self.target = target
        self.announce = announce
        self.reopen_s = reopen_s
        self.opened = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._worker, args=(src,), daemon=True)
            for src in sources
            for _ in range(per_source)
        ]

    def __enter__(self) -> SlowLoris:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)

    def _worker(self, source: str) -> None:
        while not self._stop.is_set():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(0.5)
            try:
                sock.bind((source, 0))
                sock.connect(self.target)
                sock.sendall(struct.pack(">I", self.announce))
                with self._lock:
                    self.opened += 1
                while not self._stop.is_set():
                    try:
                        if not sock.recv(1):
                            break
                    except TimeoutError:
                        continue
            except OSError:
                pass
            finally:
                sock.close()
            self._stop.wait(self.reopen_s)


def test_a_node_joins_through_a_daemon_under_a_connection_flood(cluster: Cluster) -> None:
    seed = cluster.spawn("seed")
    seed.wait_ready()
    joiner = cluster.spawn("joiner")
    joiner.wait_ready()
    host, port = seed.host, seed.port
    # Two attacking hosts, 36 connections each: more than the 64 slots.
    with SlowLoris((host, port), [fresh_host(), fresh_host()], 36) as attack:

        def refusing() -> bool:
            c = seed.counters()
            return c.get("tcp_drop_busy", 0) + c.get("tcp_drop_per_source_cap", 0) > 0

        wait_until(refusing, 10, "the seed refusing the attacker's extra connections")
        results = []
        for _ in range(3):  # a few tries, not a poll: a slot freeing by chance is no proof
            results.append(joiner.api("join", addrs=[seed.addr]))
            if results[-1]["ok"]:
                break
        assert results[-1]["ok"] == 1, f"no join through the flooded seed: {results}"
        wait_converged([seed, joiner])
        assert attack.opened > 0
        counters = seed.counters()
    # Each refusal is counted with its reason and shows in `peerd metrics`.
    assert counters.get("tcp_drop_per_source_cap", 0) > 0, counters
    metrics = subprocess.run(
        [sys.executable, "-m", "peerd", "metrics", "--api-socket", str(seed.sock)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert metrics.returncode == 0, metrics.stderr
    assert 'peerd_drops_total{layer="tcp",reason="per_source_cap"}' in metrics.stdout
    # Logged, rate limited: far fewer lines than refusals.
    lines = seed.log().count("tcp too many unauthenticated connections from one address")
    assert 0 < lines < counters["tcp_drop_per_source_cap"], (lines, counters)
