"""What one client may cost the API server (peerd.shell.api_limits), in process.

Connections go over in-memory streams and the clock is trio's mock clock
(autojump), so hours of idleness take no time. Peer credentials are handed
in by the listener (a memory stream has none), which is how the per-uid
share is tested without switching users; tests/proc/test_api_limits_proc.py
does it with real users against a real daemon.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from peerd.api.protocol import HEADER, encode_frame
from peerd.shell.api_limits import ApiLimits, api_limits_problem
from peerd.shell.api_server import ApiServer, Connection, PeerCred
from peerd.shell.metrics import render

from .conftest import FakeBackend, RawConn

DAEMON_UID = 4242  # the daemon's own user in these tests (privileged, like root)


class Listener(trio.abc.Listener[trio.abc.Stream]):
    """In-memory connections, each with the uid the test says it has.
    ``lockstep``: the client's end only takes bytes when it reads (a client
    that does not read pushes back on the server's writer at once)."""

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[trio.abc.Stream](0)
        self.creds: dict[int, PeerCred] = {}

    async def connect(self, uid: int | None = 1000, lockstep: bool = False) -> Client:
        if lockstep:
            client, server = trio.testing.lockstep_stream_pair()
        else:
            client, server = trio.testing.memory_stream_pair()
        if uid is not None:
            self.creds[id(server)] = PeerCred(1, uid, uid)
        await self.send.send(server)
        return Client(client)

    def cred(self, stream: trio.abc.Stream) -> PeerCred | None:
        return self.creds.get(id(stream))

    async def accept(self) -> trio.abc.Stream:
        stream: trio.abc.Stream = await self.receive.receive()
        return stream

    async def aclose(self) -> None:
        self.receive.close()


class Client(RawConn):
    """A raw connection (tests/api/conftest.py) with a one-call helper."""

    async def call(self, op: str, **args: Any) -> dict[Any, Any] | None:
        await self.request({"id": 1, "op": op, "args": args})
        return await self.frame()

    async def until_eof(self) -> list[dict[Any, Any]]:
        return await self.frames_until_eof()


@pytest.fixture
def listener() -> Listener:
    return Listener()


async def start(nursery: trio.Nursery, listener: Listener, backend: Any, **kw: Any) -> ApiServer:
    server = ApiServer(backend, credentials=listener.cred, daemon_uid=DAEMON_UID, **kw)
    await nursery.start(server.serve, listener)
    return server


class HoldingBackend(FakeBackend):
    """Says which connections own registry state (the runner's holds_state)."""

    def __init__(self) -> None:
        super().__init__()
        self.holding: set[int] = set()

    def holds_state(self, conn: Connection) -> bool:
        return conn.id in self.holding


# --- idle and partial-frame timeouts ----------------------------------------------


async def test_an_idle_connection_is_closed_with_a_reason(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    listener: Listener,
    backend: FakeBackend,
) -> None:
    # one connection is half of this user's share: slots are scarce
    server = await start(nursery, listener, backend, limits=ApiLimits(max_connections_per_uid=2))
    client = await listener.connect()
    assert (await client.call("status") or {})["ok"]
    t0 = trio.current_time()
    with trio.fail_after(2 * ApiLimits().idle_timeout_s):
        frames = await client.until_eof()
    assert trio.current_time() - t0 == pytest.approx(ApiLimits().idle_timeout_s, abs=1)
    assert [(f["id"], f["error"]["code"]) for f in frames] == [(None, "unavailable")]
    assert "idle for 300 s" in frames[0]["error"]["message"]
    assert server.counters["refused.idle_timeout"] == 1
    assert server.connections == {}


async def test_idle_connections_are_closed_only_while_slots_are_scarce(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    listener: Listener,
    backend: FakeBackend,
) -> None:
    # The default limits (no idle timeout at all before: 256 such
    # connections locked every local client out for good). A lone quiet
    # client (a connection kept for rare calls) keeps its connection ...
    await start(nursery, listener, backend)
    lone = await listener.connect(uid=1000)
    await trio.sleep(3 * ApiLimits().idle_timeout_s)
    assert (await lone.call("status") or {})["ok"]
    # ... but a user holding half its share or more gives idle ones back,
    # down to below half.
    share = ApiLimits().max_connections_per_uid
    hoard = [await listener.connect(uid=2000) for _ in range(share // 2 + 2)]
    closed = 0
    with trio.move_on_after(3 * ApiLimits().idle_timeout_s):
        async with trio.open_nursery() as inner:

            async def wait_eof(c: Any) -> None:
                nonlocal closed
                frames = await c.until_eof()
                assert "idle" in frames[0]["error"]["message"]
                closed += 1

            for c in hoard:
                inner.start_soon(wait_eof, c)
    assert closed == 3  # share // 2 + 2 -> share // 2 - 1
    assert (await lone.call("status") or {})["ok"]


async def test_a_connection_holding_a_watch_names_or_a_call_is_never_idle(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, listener: Listener
) -> None:
    backend = HoldingBackend()
    # four connections of one user with a share of four: slots are scarce
    limits = ApiLimits(idle_timeout_s=10, max_connections_per_uid=4)
    server = await start(nursery, listener, backend, limits=limits)
    watcher = await listener.connect()
    await watcher.request({"id": 5, "op": "watch", "args": {"topics": ["members"]}})
    assert await watcher.frame() == {"id": 5, "ok": True, "result": {}}
    owner = await listener.connect()
    owner_id = (await owner.call("whoami") or {})["result"]["conn"]
    backend.holding.add(owner_id)
    caller = await listener.connect()
    await caller.request({"id": 9, "op": "slow"})
    bare = await listener.connect()
    await trio.sleep(24 * 3600)  # a day of silence (mock clock)
    # Only the bare connection was closed.
    assert server.counters["refused.idle_timeout"] == 1
    assert len(server.connections) == 3
    assert await bare.until_eof() != []
    backend.emit("joined", {"name": "n1"})
    assert (await watcher.frame() or {})["event"] == "joined"
    backend.release.set()
    assert (await caller.frame() or {})["result"] == "slow done"
    # Once the call answered and the owner let go, both are idle like any other.
    backend.holding.clear()
    with trio.fail_after(30):
        assert "idle" in (await caller.until_eof())[0]["error"]["message"]
        assert "idle" in (await owner.until_eof())[0]["error"]["message"]


async def test_a_stalled_partial_frame_is_closed_after_the_read_timeout(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    listener: Listener,
    backend: FakeBackend,
) -> None:
    server = await start(nursery, listener, backend)
    client = await listener.connect()
    body = (1 << 20) - 1
    # 1 MiB - 1 of a frame announced, all but one byte sent, then nothing.
    await client.stream.send_all(HEADER.pack(body) + b"\xa0" + b"x" * (body - 2))
    t0 = trio.current_time()
    with trio.fail_after(60):
        frames = await client.until_eof()
    assert trio.current_time() - t0 == pytest.approx(ApiLimits().read_timeout_s, abs=0.5)
    assert "not finished within 10 s" in frames[0]["error"]["message"]
    assert server.counters["refused.read_timeout"] == 1
    assert server.connections == {}


async def test_a_slow_drip_of_one_frame_is_not_a_new_timeout_per_byte(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    listener: Listener,
    backend: FakeBackend,
) -> None:
    server = await start(nursery, listener, backend)
    client = await listener.connect()
    frame = encode_frame({"id": 1, "op": "echo", "args": {"pad": "x" * 100}})
    t0 = trio.current_time()
    with trio.move_on_after(60), pytest.raises(trio.BrokenResourceError):
        for i in range(len(frame) - 1):  # one byte every 2 s: never finished
            await client.stream.send_all(frame[i : i + 1])
            await trio.sleep(2)
    assert server.counters["refused.read_timeout"] == 1
    assert trio.current_time() - t0 < 15
    # Whole frames, however far apart, are fine.
    client = await listener.connect()
    for _ in range(3):
        await trio.sleep(200)
        assert (await client.call("status") or {})["ok"]
    assert server.counters["refused.read_timeout"] == 1


# --- connection slots: per uid, and a reserve for root and the daemon's user ------


async def test_one_user_cannot_take_the_slots_of_others_or_roots(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    listener: Listener,
    backend: FakeBackend,
) -> None:
    limits = ApiLimits(max_connections=20, max_connections_per_uid=6, reserved_connections=4)
    server = await start(nursery, listener, backend, limits=limits)
    mine = [await listener.connect(uid=1000) for _ in range(6)]
    for c in mine:
        assert (await c.call("status") or {})["ok"]
    refused = await listener.connect(uid=1000)
    frames = await refused.until_eof()
    assert frames[0]["error"]["code"] == "unavailable"
    assert "from uid 1000 (limit 6 per user)" in frames[0]["error"]["message"]
    assert server.counters["refused.uid_limit"] == 1
    # Other users still get in, up to the reserve...
    others = [await listener.connect(uid=2000 + i // 5) for i in range(10)]
    for c in others:
        assert (await c.call("status") or {})["ok"]
    assert len(server.connections) == 16
    late = await listener.connect(uid=3000)
    assert "kept for root" in (await late.until_eof())[0]["error"]["message"]
    assert server.counters["refused.reserved"] == 1
    # ...which root and the daemon's own user still have: `peerd status` works.
    admins = []
    for uid in (0, DAEMON_UID, 0, DAEMON_UID):
        admins.append(admin := await listener.connect(uid=uid))
        assert (await admin.call("status") or {})["ok"]
    full = await listener.connect(uid=0)
    assert "limit 20" in (await full.until_eof())[0]["error"]["message"]
    assert server.counters["refused.connection_limit"] == 1
    assert server.counters["refused_connections"] == 3
    # Slots freed are slots again (the admins leave, and one of uid 1000's).
    for c in [*admins, mine[0]]:
        await c.stream.aclose()
    with trio.fail_after(5):
        while server.admission.total != 15:
            await trio.sleep(0.01)
    assert server.admission.by_uid[1000] == 5
    again = await listener.connect(uid=1000)
    assert (await again.call("status") or {})["ok"]


# --- bytes waiting for a client that does not read --------------------------------


async def test_the_outgoing_queue_is_bounded_in_bytes(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    listener: Listener,
    backend: FakeBackend,
) -> None:
    server = await start(nursery, listener, backend)
    client = await listener.connect(lockstep=True)
    assert (await client.call("whoami") or {})["ok"]
    (conn,) = server.connections.values()
    pad = "x" * 60_000
    accepted = 0
    while conn.push_nowait(0, "conflict", {"pad": pad}):  # the client never reads
        accepted += 1
        assert accepted < 1000
    frame_size = len(encode_frame({"stream": 0, "event": "conflict", "data": {"pad": pad}}))
    # The queue's bound, plus the one frame the writer holds while it blocks.
    assert accepted * frame_size <= ApiLimits().queue_bytes + frame_size
    assert accepted * frame_size > ApiLimits().queue_bytes - frame_size
    assert server.counters["refused.queue_full"] == 1
    # A request's answer waits for room (the client is pushed back), and the
    # connection goes on once the client reads.
    await client.request({"id": 2, "op": "status"})
    frames = []
    while not any(f.get("id") == 2 for f in frames):
        frame = await client.frame()
        assert frame is not None
        frames.append(frame)
    assert len(frames) == accepted + 1
    assert conn.push_nowait(0, "conflict", {"pad": "after"})


# --- all mailboxes together ---------------------------------------------------------


async def test_all_mailboxes_share_one_budget(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    listener: Listener,
    backend: FakeBackend,
) -> None:
    server = await start(
        nursery, listener, backend, mailbox_bytes=100_000, mailbox_total_bytes=150_000
    )
    a = await listener.connect(lockstep=True)
    b = await listener.connect(lockstep=True)
    for c in (a, b):
        assert (await c.call("whoami") or {})["ok"]
    ca, cb = server.connections.values()
    pad = b"m" * 10_000

    def fill(conn: Connection) -> int:
        n = 0
        while conn.offer(0, "message", {"payload": pad}) == "ok":
            n += 1
            assert n < 100
        return n

    await trio.testing.wait_all_tasks_blocked()
    taken_a = fill(ca)  # its own bound: 100,000 bytes
    assert server.counters["refused.mailbox_full"] == 1
    taken_b = fill(cb)  # what is left of the daemon's 150,000
    assert server.counters["refused.mailbox_budget"] == 1
    assert taken_b < taken_a
    assert server.shared.mailboxes.used <= 150_000
    # A connection that goes gives its share back.
    await a.stream.aclose()
    with trio.fail_after(5):
        while ca.id in server.connections:
            await trio.sleep(0.01)
    assert server.shared.mailboxes.used == cb._mailbox_bytes
    assert cb.offer(0, "message", {"payload": pad}) == "ok"


# --- settings and metrics ---------------------------------------------------------


def test_limits_are_checked_against_their_bounds() -> None:
    assert api_limits_problem(ApiLimits()) is None
    assert api_limits_problem(ApiLimits(idle_timeout_s=0))[0] == "idle_timeout_s"  # type: ignore[index]
    assert api_limits_problem(ApiLimits(max_connections_per_uid=250))[0] == (  # type: ignore[index]
        "max_connections_per_uid"
    )
    assert api_limits_problem(ApiLimits(reserved_connections=200))[0] == (  # type: ignore[index]
        "reserved_connections"
    )
    assert api_limits_problem(ApiLimits(queue_bytes=10**15))[0] == "queue_bytes"  # type: ignore[index]


def test_refusals_are_metrics_with_a_reason() -> None:
    text = render(
        {"counters": {"api_refused.uid_limit": 3, "api_refused.idle_timeout": 1}, "gauges": {}}
    )
    assert 'peerd_api_refusals_total{reason="uid_limit"} 3' in text
    assert 'peerd_api_refusals_total{reason="idle_timeout"} 1' in text


def test_api_settings_are_read_and_checked() -> None:
    from peerd.shell.settings import SettingsError, build_api, build_messages

    assert build_api({"idle_timeout_s": 60, "max_connections_per_uid": 8}) == ApiLimits(
        idle_timeout_s=60.0, max_connections_per_uid=8
    )
    for bad, key in (
        ({"idle_timeout_s": 0}, "api.idle_timeout_s"),
        ({"read_timeout_s": 1e300}, "api.read_timeout_s"),
        ({"max_connections": 100, "max_connections_per_uid": 90}, "api.max_connections_per_uid"),
        ({"nope": 1}, "api.nope"),
    ):
        with pytest.raises(SettingsError) as e:
            build_api(bad)
        assert e.value.key == key
    assert build_messages({}).mailbox_total_bytes == 64 << 20
    with pytest.raises(SettingsError) as e:
        build_messages({"mailbox_total_bytes": 1000})
    assert e.value.key == "messages.mailbox_total_bytes"
