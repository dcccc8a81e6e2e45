"""Replies that always find the sender (issue 13), through real daemons.

Three ``peerd agent`` processes on loopback. A service holds ``svc`` on one
node and answers every message twice: by the message's ``reply_to`` token
(the sending connection, through the node it came from) and by the sender's
registered name (``data["from"]`` in ``data["from_scope"]``). Callers on the
two other nodes each open a fresh connection, register a fresh name and
send at once: no delay, no ``wait="settled"``. Every one of the 1,000
callers must get both answers. Before this issue the answer by name failed
most of the time with ``not_found`` (the message outran the caller's
registration), and there was no ``reply_to``.

The figures (count, reply latency p50/p99) are printed and recorded in
benchmarks/messages/RESULTS.md with the command.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Any

import pytest

from peerd.api.client import BlockingClient
from peerd.api.protocol import ApiError

from .harness import Cluster, wait_until

pytestmark = pytest.mark.proc

TRIALS = int(os.environ.get("PEERD_REPLY_TRIALS", "1000"))
BOUND_S = 600.0  # the whole run; a trial takes a few ms
REPLY_WAIT_S = 5.0
# Which answers the service gives (both by default; "from" alone measures
# the answer by name, e.g. against an older daemon that has no reply_to).
HOWS = tuple(os.environ.get("PEERD_REPLY_BY", "reply_to,from").split(","))
FAIL_FAST = 20  # stop after this many callers missed a reply (the figure is clear by then)


class Service:
    """Holds ``svc`` and answers each message by reply_to and by name."""

    def __init__(self, sock: str) -> None:
        self.client = BlockingClient(sock, timeout=10)
        self.client.register("svc")
        self.stop = threading.Event()
        self.served = 0
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self.run, name="svc", daemon=True)

    def run(self) -> None:
        deadline = time.monotonic() + BOUND_S
        while not self.stop.is_set() and time.monotonic() < deadline:
            msg = self.client.receive_message(0.1)
            if msg is None:
                continue
            d = msg.data
            for how in HOWS:
                try:
                    if how == "reply_to":
                        r = self.client.reply(msg, b"by-token:" + d["payload"])
                    else:
                        r = self.client.send(
                            d["from"],
                            b"by-name:" + d["payload"],
                            scope=d.get("from_scope") or "default",
                        )
                    if r != {"delivered": 1}:
                        self.failures.append(f"{how} {d['from']}: {r}")
                except Exception as e:  # ApiError; on a daemon without reply_to, anything
                    self.failures.append(f"{how} {d['from']}: {e!r}")
            self.served += 1


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_every_reply_finds_a_caller_that_just_registered(cluster: Cluster) -> None:
    daemons = cluster.start_cluster(["ra", "rb", "rc"])
    svc_d, callers = daemons[0], daemons[1:]
    service = Service(str(svc_d.sock))
    service.thread.start()
    try:
        for d in callers:
            with BlockingClient(d.sock, timeout=10) as c:
                wait_until(lambda c=c: c.lookup("svc"), 10.0, f"svc visible at {d.name}")
        by_token: list[float] = []
        by_name: list[float] = []
        missing: list[str] = []
        deadline = time.monotonic() + BOUND_S
        for i in range(TRIALS):
            assert time.monotonic() < deadline, f"over {BOUND_S} s after {i} trials"
            d = callers[i % 2]
            me = f"caller-{i}"
            with BlockingClient(d.sock, timeout=10) as caller:
                caller.register(me)  # and at once:
                t0 = time.perf_counter()
                assert caller.send("svc", str(i)) == {"delivered": 1}
                got: dict[str, Any] = {}
                for _ in range(len(HOWS)):
                    reply = caller.receive_message(REPLY_WAIT_S)
                    if reply is None:
                        break
                    got[reply.data["kind"]] = (time.perf_counter() - t0, reply.data)
            if "reply" in got:
                assert got["reply"][1]["payload"] == b"by-token:%d" % i
                assert got["reply"][1]["from"] == "svc"
                by_token.append(got["reply"][0])
            if "name" in got:
                assert got["name"][1]["payload"] == b"by-name:%d" % i
                assert got["name"][1]["name"] == me
                by_name.append(got["name"][0])
            if len(got) != len(HOWS):
                missing.append(f"{me}: got {sorted(got)}")
                if len(missing) >= FAIL_FAST:
                    break
    finally:
        service.stop.set()
        service.thread.join(5)
        service.client.close()
    trials = i + 1
    ms = 1000.0
    print(
        f"\n{trials} callers: {len(by_token)} replies by reply_to, {len(by_name)} by name; "
        f"latency from send to reply (ms) by reply_to p50 {pct(by_token, 0.5) * ms:.2f} "
        f"p99 {pct(by_token, 0.99) * ms:.2f}, by name p50 {pct(by_name, 0.5) * ms:.2f} "
        f"p99 {pct(by_name, 0.99) * ms:.2f} (mean {statistics.fmean(by_name) * ms:.2f})"
        if by_token and by_name
        else f"\n{trials} callers: {len(by_name)} of them answered by name"
        if by_name
        else f"\n{trials} callers: {len(by_token)} by reply_to, {len(by_name)} by name"
    )
    assert not service.failures, (
        f"{len(service.failures)} of {2 * trials} answers failed: {service.failures[:5]}"
    )
    assert not missing, f"{len(missing)} callers missed a reply: {missing[:5]}"
    assert service.served == TRIALS
    assert len(by_token) == TRIALS * ("reply_to" in HOWS)
    assert len(by_name) == TRIALS * ("from" in HOWS)


def test_reply_to_reaches_that_connection_only_and_the_cli_uses_it(cluster: Cluster) -> None:
    import subprocess
    import sys

    a, b, _ = cluster.start_cluster(["ta", "tb", "tc"])
    with (
        BlockingClient(a.sock, timeout=10) as svc,
        BlockingClient(b.sock, timeout=10) as asker,
    ):
        svc.register("echo")
        wait_until(lambda: asker.lookup("echo"), 10.0, "echo visible at tb")
        # The asker holds no name: only reply_to can answer it.
        assert asker.send("echo", b"q1") == {"delivered": 1}
        msg = svc.receive_message(10)
        assert msg is not None and msg.data["from"] is None
        token = msg.data["reply_to"]
        cli = subprocess.run(
            [sys.executable, "-m", "peerd", "send", "--api-socket", str(a.sock)]
            + ["--reply-to", token, "pong"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert cli.returncode == 0 and cli.stdout.strip() == "delivered to 1", cli.stderr
        reply = asker.receive_message(10)
        assert reply is not None and reply.data["kind"] == "reply"
        assert (reply.data["payload"], reply.data["from"]) == (b"pong", None)
        # Another connection of the same process and daemon gets nothing.
        with BlockingClient(b.sock, timeout=10) as other:
            assert other.send("echo", b"q2") == {"delivered": 1}
            msg2 = svc.receive_message(10)
            assert msg2 is not None and msg2.data["reply_to"] != token
        # That connection closed: its token answers not_found, never another.
        with pytest.raises(ApiError) as e:
            svc.reply(msg2, b"late")
        assert e.value.code == "not_found" and "gone" in e.value.message
        assert svc.reply(msg, b"still here") == {"delivered": 1}
        assert asker.receive_message(10) is not None
    # A daemon life that ended: the restarted tb (new generation) refuses the token.
    b.terminate()
    b.wait_exit(20)
    cluster.start(b, join=[a.addr])
    b.wait_ready()
    with BlockingClient(a.sock, timeout=10) as svc2:
        wait_until(
            lambda: any(
                m["name"] == "tb" and m["status"] == "alive" and m["generation"] == 2
                for m in svc2.call("members")
            ),
            15.0,
            "tb's second life known at ta",
        )
        with pytest.raises(ApiError) as e:
            svc2.send(payload=b"x", reply_to=token)
        assert e.value.code == "not_found"
