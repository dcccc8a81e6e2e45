"""The daemon as real OS processes on loopback (issue 2).

Every test starts its own daemons (see ``conftest.py``): own state
directories, API sockets and 127.x.y.z addresses with ports found free, so
runs never collide. Protocol behaviour is awaited by polling the API with a
bounded deadline, never by sleeping.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from peerd.api.client import BlockingClient
from peerd.api.protocol import FrameDecoder, Response, parse_server_frame
from peerd.wire.seal import generate_key, key_id, parse_key

from .harness import (
    Cluster,
    Daemon,
    Watcher,
    fresh_host,
    hold_for,
    status_everywhere,
    view,
    wait_converged,
    wait_until,
)

pytestmark = pytest.mark.proc

# Detection bound for `kill -9` under the lan preset. A daemon that dies on a
# live host closes its watch link and its UDP port: the node linked to it
# notices at once, any probe gets ICMP port-unreachable, and either hint starts
# a suspicion of refused_suspicion_timeout_s (0.5 s on lan) before "dead",
# which then spreads by gossip every 0.2 s. README ("Fast crash detection")
# promises "dead in about a second"; 3 s leaves room for a busy 2-core CI box.
LAN_KILL_DETECTION_BOUND_S = 3.0

# How long the leaving daemon may take to exit by itself: leave_propagate_s
# (0.5 s local, 1 s lan) plus start-up of the answer, with a margin.
LEAVE_EXIT_BOUND_S = 8.0

Watchers = Callable[[Sequence[Daemon]], list[Watcher]]


def cli(
    *args: str, stdin: str | None = None, timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peerd", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def bad_events(w: Watcher, names: set[str]) -> list[tuple[str, str]]:
    """Events saying one of ``names`` is in trouble or gone."""
    return [
        (ev, data.get("name", "?"))
        for _t, ev, data in list(w.events)
        if ev in ("suspect", "dead", "left", "reaped") and data.get("name") in names
    ]


def wait_event(ws: Sequence[Watcher], name: str, event: str, timeout: float = 5.0) -> None:
    """Every watcher has received ``event`` about ``name`` (the watch stream may
    trail the members list by a moment)."""
    wait_until(
        lambda: all(event in [ev for _t, ev in w.about(name)] for w in ws),
        timeout,
        f"a {event!r} event about {name} on every watch",
    )


def counter_sum(counters: dict[str, int], pred: Callable[[str], bool]) -> int:
    return sum(v for k, v in counters.items() if pred(k))


def seal_drops(counters: dict[str, int]) -> int:
    return counter_sum(counters, lambda k: k.startswith(("udp_drop_seal", "tcp_drop_seal")))


# --- 1. convergence ---------------------------------------------------------------


def test_five_daemons_converge(cluster: Cluster) -> None:
    daemons = cluster.start_cluster(["seed", "n1", "n2", "n3", "n4"], converge=False)
    wait_converged(daemons, timeout=15.0)
    ids = {d.name: d.status()["id"] for d in daemons}
    assert len(set(ids.values())) == 5
    # Checked once more through the CLI, which is what operators use.
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "peerd", "members", "--api-socket", str(d.sock), "--json"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for d in daemons
    ]
    for d, p in zip(daemons, procs, strict=True):
        out, _ = p.communicate(timeout=20)
        assert p.returncode == 0, f"peerd members on {d.name} exited {p.returncode}"
        listed = json.loads(out)
        assert sorted(m["name"] for m in listed) == sorted(ids)
        for m in listed:
            owner = next(x for x in daemons if x.name == m["name"])
            assert (m["status"], m["addr"], m["id"]) == ("alive", owner.addr, ids[m["name"]]), (
                f"{d.name} lists {m}"
            )
            assert m["generation"] == 1


# --- 2. kill -9 -----------------------------------------------------------------


def test_kill9_is_detected_everywhere_within_the_lan_bound(
    cluster: Cluster, watchers: Watchers, capsys: pytest.CaptureFixture[str]
) -> None:
    daemons = cluster.start_cluster(["a", "b", "c", "d"], preset="lan")
    victim, survivors = daemons[2], [d for d in daemons if d is not daemons[2]]
    ws = watchers(survivors)
    t0 = time.monotonic()
    victim.kill9()
    wait_until(
        lambda: status_everywhere(survivors, victim.name, "dead"),
        15.0,
        f"every survivor to list {victim.name} dead",
    )
    seen = time.monotonic() - t0
    wait_event(ws, victim.name, "dead")
    # Exact times from the watch streams (the poll above only bounds them).
    dead_at = {}
    for w in ws:
        times = [t for t, ev in w.about(victim.name) if ev == "dead"]
        dead_at[w.daemon.name] = times[0] - t0
    with capsys.disabled():
        print(
            "\n[proc] lan kill -9 detection: dead at "
            + ", ".join(f"{n} {s:.2f} s" for n, s in sorted(dead_at.items()))
            + f" (all listed dead by {seen:.2f} s; bound {LAN_KILL_DETECTION_BOUND_S} s)"
        )
    assert max(dead_at.values()) <= LAN_KILL_DETECTION_BOUND_S, dead_at
    # Nobody else was hurt on the way.
    for d in survivors:
        v = view(d)
        assert all(v[s.name] == ("alive", s.addr) for s in survivors), (d.name, v)
    for w in ws:
        assert not bad_events(w, {s.name for s in survivors}), (w.daemon.name, w.events)


def test_frozen_daemon_is_found_by_probing_and_refutes_when_it_resumes(
    cluster: Cluster, watchers: Watchers, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGSTOP: no closed port and no closed link, so only probing finds it.

    Bound (local preset, 4 nodes): the suspicion timeout starts at
    suspicion_max_timeout_mult * suspicion_mult * log10(4) * 1 s = 10.8 s and
    shrinks with confirmations towards 1.8 s; add a probe round to suspect."""
    daemons = cluster.start_cluster(["a", "b", "c", "d"])
    frozen, others = daemons[3], daemons[:3]
    ws = watchers(others)
    t0 = time.monotonic()
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        wait_until(
            lambda: status_everywhere(others, frozen.name, "dead"),
            15.0,
            f"{frozen.name} (stopped) listed dead everywhere",
        )
        dead_after = time.monotonic() - t0
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    t1 = time.monotonic()
    wait_converged(daemons, timeout=10.0)
    back_after = time.monotonic() - t1
    wait_event(ws, frozen.name, "alive")
    with capsys.disabled():
        print(
            f"\n[proc] SIGSTOP (local): dead everywhere by {dead_after:.2f} s; "
            f"alive again {back_after:.2f} s after SIGCONT"
        )
    for w in ws:
        events = [ev for _t, ev in w.about(frozen.name)]
        assert events[:1] == ["suspect"] and events[-1] == "alive", (w.daemon.name, events)
    assert all(d.members()[frozen.name]["incarnation"] > 1 for d in daemons)
    assert all(d.members()[frozen.name]["generation"] == 1 for d in daemons)  # same life


# --- 3. leave -------------------------------------------------------------------


def test_leave_command_marks_left_everywhere_and_the_daemon_exits_0(
    cluster: Cluster, watchers: Watchers
) -> None:
    daemons = cluster.start_cluster(["a", "b", "c"])
    leaver, stayers = daemons[1], [daemons[0], daemons[2]]
    ws = watchers(stayers)
    done = cli("leave", "--api-socket", str(leaver.sock))
    assert done.returncode == 0, done.stderr
    assert "left the cluster" in done.stdout
    assert leaver.wait_exit(LEAVE_EXIT_BOUND_S) == 0
    wait_until(
        lambda: status_everywhere(stayers, leaver.name, "left"),
        10.0,
        f"{leaver.name} listed left everywhere",
    )
    wait_event(ws, leaver.name, "left")
    for w in ws:
        events = [ev for _t, ev in w.about(leaver.name)]
        assert "left" in events and "dead" not in events and "suspect" not in events, (
            w.daemon.name,
            events,
        )
    for d in stayers:
        v = view(d)
        assert all(v[s.name] == ("alive", s.addr) for s in stayers), v
    assert "left the cluster" in leaver.log()


# --- 4. restart with the same state directory -------------------------------------


def test_killed_daemon_restarted_with_its_state_dir_rejoins(cluster: Cluster) -> None:
    """Same state directory and address, no --join. (Here the peers also get it
    back by themselves: they keep contacting a dead member's address; the next
    test takes that path away.)"""
    a, b, c = cluster.start_cluster(["a", "b", "c"])
    before = c.status()
    c.kill9()
    wait_until(lambda: status_everywhere([a, b], "c", "dead"), 10.0, "c listed dead")
    dead = a.members()["c"]
    cluster.start(c)  # same state dir and address, no --join
    c.wait_ready()
    wait_converged([a, b, c], timeout=15.0)
    for observer in (a, b, c):
        back = observer.members()["c"]
        assert back["id"] == before["id"] == dead["id"]
        assert back["incarnation"] > dead["incarnation"], (observer.name, back, dead)
        assert back["generation"] == before["generation"] + 1
    assert c.status()["id"] == before["id"]


def test_killed_daemon_rejoins_from_its_persisted_peers_at_a_new_address(cluster: Cluster) -> None:
    a, b, c = cluster.start_cluster(["a", "b", "c"])
    before = c.status()
    # The daemon rewrites its peers file within a fraction of a second of a
    # membership change (not only every minute); kill it as soon as it has.
    peers_file = c.state_dir / "peers"
    wait_until(
        lambda: (
            peers_file.exists()
            and a.addr.split(":")[0] in peers_file.read_text()
            and b.addr.split(":")[0] in peers_file.read_text()
        ),
        3.0,
        "c saved its peers",
    )
    c.kill9()
    wait_until(lambda: status_everywhere([a, b], "c", "dead"), 10.0, "c listed dead")
    # A new address: a and b keep retrying c's old one, so only c's own saved
    # peers can bring it back.
    c.host = fresh_host()
    c.port = 0
    cluster.start(c, bind=f"{c.host}:0")
    c.port = int(c.wait_ready()["addr"].rsplit(":", 1)[1])
    wait_converged([a, b, c], timeout=3.0)  # a join at start takes ~0.3 s here
    assert a.members()["c"]["id"] == before["id"]


# --- 5. keys --------------------------------------------------------------------


def test_only_daemons_with_the_cluster_key_are_accepted(cluster: Cluster, tmp_path: Path) -> None:
    keys = []
    for _ in range(2):
        made = cli("keys", "generate")
        assert made.returncode == 0, made.stderr
        parse_key(made.stdout.strip())  # one line, in the key format
        keys.append(made.stdout)
    assert keys[0] != keys[1]
    good_file, other_file = tmp_path / "cluster.keys", tmp_path / "other.keys"
    good_file.write_text(keys[0])
    other_file.write_text(keys[1])
    members = cluster.start_cluster(["a", "b", "c"], key_file=good_file)
    seed = members[0]
    assert seal_drops(seed.counters()) == 0
    wrong = cluster.spawn("wrongkey", key_file=other_file, join=[seed.addr])
    nokey = cluster.spawn("nokey", join=[seed.addr])
    outsiders = [wrong, nokey]
    for d in outsiders:
        d.wait_ready()

    def refused(c: dict[str, int]) -> tuple[int, int]:
        return (
            counter_sum(c, lambda k: k.endswith("seal_unknown_key")),
            counter_sum(c, lambda k: k.endswith("seal_plaintext_rejected")),
        )

    # Their join attempts did arrive, and the seal refused both kinds.
    wait_until(
        lambda: min(refused(seed.counters())) >= 1,
        10.0,
        "the seed to refuse the outsiders' wrongly sealed and plaintext joins",
    )

    want = {d.name: ["a", "b", "c"] for d in members} | {d.name: [d.name] for d in outsiders}

    def nobody_let_in() -> bool:
        views = {d.name: sorted(d.members()) for d in [*members, *outsiders]}
        assert views == want
        return True

    # A few seconds: the outsiders retry their seed (backoff from 1 s) meanwhile.
    hold_for(nobody_let_in, 3.0, "the keyed cluster staying closed to outsiders")
    assert all(d.running() for d in outsiders)


def test_key_rotation_without_downtime(
    cluster: Cluster, watchers: Watchers, tmp_path: Path
) -> None:
    old, new = generate_key(), generate_key()
    key_file = tmp_path / "cluster.keys"
    key_file.write_text(old + "\n")
    # lan timing: its 0.5 s probe timeout keeps a busy CI box from false suspicions.
    daemons = cluster.start_cluster(["a", "b", "c"], key_file=key_file, preset="lan")
    names = {d.name for d in daemons}
    ws = watchers(daemons)
    start_drops = {d.name: seal_drops(d.counters()) for d in daemons}
    old_id, new_id = key_id(parse_key(old)).hex(), key_id(parse_key(new)).hex()

    def traffic_flows(datagrams: int) -> None:
        """Every daemon receives ``datagrams`` more it can open (~2 a second:
        the probe it answers and the ack of its own)."""
        rx = {d.name: d.counters().get("udp_rx", 0) for d in daemons}
        wait_until(
            lambda: all(d.counters().get("udp_rx", 0) >= rx[d.name] + datagrams for d in daemons),
            10.0,
            "datagrams to keep flowing",
        )

    def keyring(d: Daemon) -> list[tuple[str, bool]]:
        return sorted((k["id"], k["primary"]) for k in d.api("keys.list"))

    for d in daemons:
        assert keyring(d) == [(old_id, True)]
        assert d.api("keys.install", key=new) == {}
        assert keyring(d) == sorted([(old_id, True), (new_id, False)])
    for d in daemons:
        assert d.api("keys.use", key=new) == {}
        assert keyring(d) == sorted([(old_id, False), (new_id, True)])
    traffic_flows(2)
    for d in daemons:
        assert d.api("keys.remove", key=old) == {}
        assert keyring(d) == [(new_id, True)]
    # More than a probe round under the new key alone: a daemon still sealing
    # with the old key would have its datagrams dropped (counted) and its
    # probes unanswered (suspect events).
    traffic_flows(4)
    for d in daemons:
        assert seal_drops(d.counters()) == start_drops[d.name], (d.name, d.counters())
        assert view(d) == {x.name: ("alive", x.addr) for x in daemons}
    for w in ws:
        assert w.ended is None, (w.daemon.name, w.ended)
        assert not bad_events(w, names), (w.daemon.name, w.events)
    # The keyring was persisted, and wins over the (now stale) --key-file at the
    # next start: a restarted daemon comes back with the new key.
    c = daemons[2]
    saved = (c.state_dir / "keyring").read_text()
    assert new in saved and old not in saved
    c.terminate()
    assert c.wait_exit(LEAVE_EXIT_BOUND_S) == 0
    wait_until(lambda: status_everywhere(daemons[:2], c.name, "left"), 10.0, "c to leave")
    cluster.start(c, join=[daemons[0].addr])
    c.wait_ready()
    assert keyring(c) == [(new_id, True)]
    wait_converged(daemons)


# --- 7, 8. refusals at start-up ---------------------------------------------------


def test_second_daemon_on_an_address_in_use_fails_at_once(cluster: Cluster) -> None:
    first = cluster.spawn("first")
    first.wait_ready()
    second = cluster.new("second", host=first.host, port=first.port)
    second.expect_failure = True
    t0 = time.monotonic()
    cluster.start(second)
    code = second.wait_exit(10.0)
    took = time.monotonic() - t0
    assert code != 0 and code == 1, second.log()
    assert "already in use" in second.log() and first.addr in second.log(), second.log()
    assert took < 5.0, f"took {took:.1f} s to fail"
    assert "Traceback" not in second.log()
    assert not second.sock.exists()
    assert first.running() and first.status()["name"] == "first"


@pytest.mark.parametrize("bind", ["0.0.0.0:0", "[::]:0"])
def test_non_loopback_bind_without_a_key_is_refused(cluster: Cluster, bind: str) -> None:
    d = cluster.new("open")
    d.expect_failure = True
    cluster.start(d, bind=bind)
    assert d.wait_exit(15.0) == 2, d.log()
    log = d.log()
    assert "--insecure" in log and "without a key" in log, log
    assert "Traceback" not in log
    assert not d.sock.exists()
    assert not (d.state_dir / "generation").exists()  # nothing was started


# --- 9. garbage --------------------------------------------------------------------


def _read_until_closed(s: socket.socket, timeout: float) -> tuple[list[Any], str]:
    """Frames the server sent, and how the connection ended."""
    decoder = FrameDecoder()
    frames: list[Any] = []
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            return frames, "reset"
        except TimeoutError:
            return frames, "still open"
        if not data:
            return frames, "closed"
        decoder.feed(data)
        while (frame := decoder.next_frame()) is not None:
            frames.append(parse_server_frame(frame))
    return frames, "still open"


def test_api_garbage_gets_an_error_frame_and_a_closed_connection(
    cluster: Cluster, watchers: Watchers
) -> None:
    d = cluster.spawn("a")
    d.wait_ready()
    rng = random.Random(20240601)
    body = bytes(rng.getrandbits(8) for _ in range(200))
    garbage = [
        bytes(rng.getrandbits(8) for _ in range(4096)),  # random: length too big
        b"\xff\xff\xff\xff" + bytes(rng.getrandbits(8) for _ in range(64)),
        len(body).to_bytes(4, "big") + body,  # a frame of random bytes
        b"\x00\x00\x00\x00",  # empty frame
        b"\x00\x00\x00\x05\xa1\x01\x02\x03\x04",  # CBOR, but trailing bytes
    ]
    assert int.from_bytes(garbage[0][:4], "big") > 1 << 20  # the seed gives an oversize header
    [watch] = watchers([d])  # a watch stream open on another connection meanwhile
    with BlockingClient(d.sock, timeout=5) as good:
        assert good.call("status")["name"] == "a"
        for data in garbage:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(d.sock))
                s.sendall(data)
                frames, end = _read_until_closed(s, 5.0)
            assert end in ("closed", "reset"), (data[:16], frames, end)
            assert len(frames) == 1, (data[:16], frames)
            resp = frames[0]
            assert isinstance(resp, Response) and resp.id is None and not resp.ok
            assert resp.error is not None and resp.error.code == "bad_frame"
            # The other connection is unaffected.
            assert [m["name"] for m in good.call("members")] == ["a"]
        # ... and so is the watch: it sees a tag update made now.
        assert good.call("set-tags", tags={"after": "garbage"}) == {"after": "garbage"}
        wait_until(
            lambda: [
                data
                for _t, ev, data in watch.events
                if ev == "updated" and data["tags"] == {"after": "garbage"}
            ],
            5.0,
            "the watch to report the tag update",
        )
        assert watch.ended is None
        counters = good.call("status")["counters"]
    assert counters["api_bad_frames"] == len(garbage), counters


def test_udp_garbage_is_dropped_and_counted(cluster: Cluster) -> None:
    a, b = cluster.start_cluster(["a", "b"])
    rng = random.Random(7)

    def rand(n: int) -> bytes:
        return bytes(rng.getrandbits(8) for _ in range(n))

    garbage: list[bytes] = [b"", b"\x00", b"\x01", b"\x02"]
    # Random bytes with a version byte that is neither sealed (1) nor plaintext (2).
    garbage += [
        bytes([rng.choice(range(3, 256))]) + rand(rng.randrange(0, 1400)) for _ in range(40)
    ]
    # Sealed-looking (a keyless daemon rejects them) and plaintext envelopes with a
    # random sender around a payload that is not a message (the core drops them).
    garbage += [b"\x01" + rand(rng.randrange(60, 600)) for _ in range(10)]
    garbage += [b"\x02\x00\x00\x00\x00" + rand(28) + rand(rng.randrange(0, 400)) for _ in range(10)]
    garbage += [rand(20000)]  # bigger than any datagram the daemon reads
    before = a.counters()

    def dropped(c: dict[str, int]) -> int:
        return counter_sum(c, lambda k: k.startswith(("udp_drop_", "drop.")))

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((fresh_host(), 0))
        for data in garbage:
            s.sendto(data, (a.host, a.port))
    wait_until(
        lambda: dropped(a.counters()) >= dropped(before) + len(garbage),
        10.0,
        f"{len(garbage)} garbage datagrams counted as drops",
    )
    after = a.counters()
    assert dropped(after) == dropped(before) + len(garbage), (before, after)
    assert a.running()
    # Still a working member: b stays alive in a's view and vice versa, and a
    # change made after the garbage spreads.
    a.api("set-tags", tags={"still": "here"})
    wait_until(
        lambda: b.members()["a"]["tags"] == {"still": "here"}, 10.0, "a's tag update to reach b"
    )
    assert view(a) == view(b) == {"a": ("alive", a.addr), "b": ("alive", b.addr)}


# --- 10. SIGTERM ------------------------------------------------------------------


def test_sigterm_leaves_gracefully_and_exits_0(cluster: Cluster, watchers: Watchers) -> None:
    daemons = cluster.start_cluster(["a", "b", "c"])
    victim, stayers = daemons[0], daemons[1:]
    ws = watchers(stayers)
    os.kill(victim.pid, signal.SIGTERM)
    assert victim.wait_exit(LEAVE_EXIT_BOUND_S) == 0, victim.log_tail()
    wait_until(
        lambda: status_everywhere(stayers, victim.name, "left"),
        10.0,
        f"{victim.name} listed left everywhere",
    )
    wait_event(ws, victim.name, "left")
    for w in ws:
        events = [ev for _t, ev in w.about(victim.name)]
        assert "left" in events and "dead" not in events and "suspect" not in events, (
            w.daemon.name,
            events,
        )
    log = victim.log()
    assert "left the cluster" in log and "Traceback" not in log
    assert not victim.sock.exists()  # the API socket is cleaned up
