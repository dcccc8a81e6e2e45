"""The runner carrying out the Peer's link, timer, broadcast and names outputs.

How membership, the registry, the mesh and names messaging are joined is the
Peer's (tests/core/test_peer.py); here a fake core emits those outputs and a
fake link manager records what the runner does with them, and what it feeds
back (mock clock). The last test runs a real Peer in the runner.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio
import trio.testing

from peerd.core import events as nev
from peerd.core.config import SwimConfig
from peerd.core.events import (
    CloseLink,
    Connect,
    Input,
    LinkDown,
    MeshTimer,
    MessageIn,
    NeighborDown,
    NeighborUp,
    Output,
    Send,
    SetTimer,
    Start,
    TimerFired,
)
from peerd.core.mesh.config import local as mesh_local
from peerd.core.names.core import NamesConfig
from peerd.core.peer import Peer
from peerd.core.timers import GraftTimeout, ShuffleTick
from peerd.shell.links import LinkLost, LinkMessages
from peerd.shell.messaging import DIRECT_PRIORITY
from peerd.wire.messages import (
    Ack,
    MeshPeer,
    NameMsg,
    NameReply,
    NameStatus,
    NeighborReply,
    RegKind,
)
from tests.shell.test_runner import ME, PEER, FakeCore, make_runner

PEER_MP = MeshPeer(PEER.node, PEER.addr)
OTHER = b"\x09" * 16


class FakeLinks:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.refuse: set[bytes] = set()  # sends to these find the link full

    def has(self, peer: bytes) -> bool:
        return any(c[:2] == ("connect", peer) for c in self.calls)

    def link_id(self, peer: bytes) -> int | None:
        return 4 if self.has(peer) else None

    def connect(self, peer: bytes, addr: Any, *, mesh: bool = True) -> None:
        self.calls.append(("connect", peer, addr, mesh))

    def send(self, peer: bytes, msg: Any, priority: int = 0, *, mesh: bool | None = None) -> bool:
        self.calls.append(("send", peer, msg, priority, mesh))
        return peer not in self.refuse

    def close(self, peer: bytes, *, mesh: bool = True) -> None:
        self.calls.append(("close", peer, mesh))

    def close_all(self) -> None:
        self.calls.append(("close_all",))

    def mesh_lost(self, peer: bytes, link: int | None) -> None:
        self.calls.append(("mesh_lost", peer, link))


async def run_briefly(runner: Any, body: Any) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await trio.sleep(0.01)
        await body()
        await runner.shutdown("test")


async def test_every_timer_type_shares_the_one_heap(autojump_clock: trio.testing.MockClock) -> None:
    t0 = trio.current_time()
    mesh_timer = ShuffleTick(7)
    deadline = nev.SendDeadline(t0 + 3, 1)

    def script(now: float, inp: Input) -> list[Output]:
        if isinstance(inp, Start):
            return [SetTimer(t0 + 5, mesh_timer), SetTimer(t0 + 3, deadline)]  # type: ignore[arg-type]
        return []

    core = FakeCore(script)
    runner, _, _ = make_runner(core, links=FakeLinks())

    async def body() -> None:
        assert runner.timers_pending == 2
        await trio.sleep(10)
        fired = [(round(t - t0, 6), i.timer) for t, i in core.inputs(TimerFired)]
        assert fired == [(3, deadline), (5, mesh_timer)]

    await run_briefly(runner, body)


async def test_link_outputs_and_inputs(autojump_clock: trio.testing.MockClock) -> None:
    def script(now: float, inp: Input) -> list[Output]:
        if isinstance(inp, Start):
            return [  # type: ignore[list-item]
                Connect(PEER_MP),
                Send(PEER.node, NeighborReply(True), 2),
                CloseLink(PEER.node),
                CloseLink(OTHER, mesh=False),  # a dead member: every link to it
                NeighborUp(PEER_MP),
                NeighborDown(PEER_MP),
            ]
        return []

    core = FakeCore(script)
    links = FakeLinks()
    runner, _, _ = make_runner(core, links=links)

    async def body() -> None:
        assert links.calls == [
            ("connect", PEER.node, PEER.addr, True),
            ("send", PEER.node, NeighborReply(True), 2, True),
            ("close", PEER.node, True),
            ("close", OTHER, False),
        ]
        assert (runner.counters["mesh_neighbor_up"], runner.counters["mesh_neighbor_down"]) == (
            1,
            1,
        )
        reply = NameReply(3, NameStatus.DELIVERED)
        await runner.send_channel.send(
            LinkMessages(PEER.node, (NeighborReply(False), Ack(1), reply))
        )
        await runner.send_channel.send(LinkLost(PEER.node, True))
        await runner.send_channel.send(LinkLost(OTHER, False, 8))
        await trio.sleep(0.01)
        # Each message the core has an input for, in order; a stray one is counted.
        assert [i for _, i in core.inputs(MessageIn)] == [
            MessageIn(PEER.node, NeighborReply(False)),
            MessageIn(PEER.node, reply),
        ]
        assert runner.counters["link_drop_unexpected"] == 1
        # Every lost link is news for the core, saying whether the mesh used it.
        assert [i for _, i in core.inputs(LinkDown)] == [
            LinkDown(PEER.node, None, True),
            LinkDown(OTHER, 8, False),
        ]

    await run_briefly(runner, body)


async def test_a_lost_mesh_link_is_released_before_the_core_hears_link_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The link manager clears the mesh's mark on a newer link to the node
    # (peerd.shell.links.LinkManager.mesh_lost) before the mesh hears
    # LinkDown, so what the mesh asks for in answer (Connect) stands.
    links = FakeLinks()
    at_link_down: list[Any] = []

    def script(now: float, inp: Input) -> list[Output]:
        if isinstance(inp, LinkDown):
            at_link_down.append(links.calls[-1] if links.calls else None)
        return []

    runner, _, _ = make_runner(FakeCore(script), links=links)

    async def body() -> None:
        await runner.send_channel.send(LinkLost(PEER.node, True, 7))
        await runner.send_channel.send(LinkLost(PEER.node, False, 8))
        await trio.sleep(0.01)
        assert at_link_down[0] == ("mesh_lost", PEER.node, 7)
        assert [c for c in links.calls if c[0] == "mesh_lost"] == [("mesh_lost", PEER.node, 7)]

    await run_briefly(runner, body)


async def test_answers_are_fed_after_the_outputs_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # LinkSend (with a seq) and DeliverToConn ask for an answer: the runner
    # feeds it once the outputs of the input are carried out, never from
    # inside them, and in the order they were asked for.
    msg = NameMsg(1, RegKind.NAME, "default", "db", 5, "", b"x")
    deliver = nev.DeliverToConn(
        9, 42, OTHER, NameMsg(3, RegKind.NAME, "default", "db", 5, "", b"hi")
    )
    trigger = TimerFired(GraftTimeout(1, b"x" * 16))
    order: list[Any] = []

    calls_at_first_answer: list[int] = []

    def script(now: float, inp: Input) -> list[Output]:
        order.append(inp)
        if isinstance(inp, nev.LinkSendDone) and not calls_at_first_answer:
            calls_at_first_answer.append(len(links.calls))
        if inp == trigger:
            return [  # type: ignore[list-item]
                nev.LinkSend(OTHER, ("127.0.0.9", 9), msg, seq=11),
                deliver,
                nev.LinkSend(OTHER, None, NameReply(2, NameStatus.DELIVERED)),  # no answer
                nev.LinkSend(PEER.node, None, msg, seq=12),  # refused
            ]
        return []

    class Conn:
        id = 42
        closed = False
        on_mail = None

        def __init__(self) -> None:
            self.offers: list[Any] = []

        def offer(self, stream: int, event: str, data: dict[str, Any]) -> str:
            self.offers.append((stream, event, data))
            return "full"

    links = FakeLinks()
    links.refuse.add(PEER.node)
    peer_like = FakeCore(script)
    peer_like.names = type("N", (), {"config": NamesConfig(send_timeout_s=3)})()  # type: ignore[attr-defined]
    runner, _, _ = make_runner(peer_like, links=links)
    conn = Conn()
    runner._reg_conns[42] = conn
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await trio.sleep(0.01)
        order.clear()
        await runner.call_in_runner(lambda: runner._handle(trigger))  # type: ignore[arg-type]
        await runner.shutdown("test")
    assert order[:4] == [
        trigger,
        nev.LinkSendDone(11, True, 4),
        nev.Offered(9, nev.OfferOutcome.FULL),
        nev.LinkSendDone(12, False, None),
    ]
    assert links.calls == [
        ("connect", OTHER, ("127.0.0.9", 9), False),
        ("send", OTHER, msg, DIRECT_PRIORITY, False),
        ("send", OTHER, NameReply(2, NameStatus.DELIVERED), DIRECT_PRIORITY, False),
        ("send", PEER.node, msg, DIRECT_PRIORITY, False),
    ]
    assert calls_at_first_answer == [4]  # every output of the input carried out first
    assert conn.offers[0][1] == "message" and conn.offers[0][2]["payload"] == b"hi"
    assert conn.on_mail is not None  # the connection reports what its writer takes


async def test_user_events_go_to_event_watchers(autojump_clock: trio.testing.MockClock) -> None:
    from peerd.api.protocol import encode_user_event
    from peerd.core.events import Broadcast, BroadcastResult, Deliver
    from peerd.wire.messages import Channel

    def script(now: float, inp: Input) -> list[Output]:
        if isinstance(inp, Broadcast):
            assert inp.channel is Channel.USER
            if len(inp.payload) > 100:
                return [BroadcastResult(inp.ref, error=("rate_limited", "slow down"))]  # type: ignore[list-item]
            return [BroadcastResult(inp.ref, id=b"\x07" * 16)]  # type: ignore[list-item]
        return []

    runner, _, _ = make_runner(FakeCore(script), links=FakeLinks())

    async def body() -> None:
        conn = object()
        events = runner.watch(conn, ["events"])
        assert await runner.call(conn, "event", {"name": "a", "payload": b"1"}) == {"id": "07" * 16}
        with pytest.raises(Exception) as e:
            await runner.call(conn, "event", {"name": "a", "payload": b"1" * 200})
        assert getattr(e.value, "code", None) == "unavailable"
        await runner.send_channel.send(
            _call(
                runner,
                Deliver(
                    b"\x08" * 16,
                    PEER.node,
                    Channel.USER,
                    encode_user_event("b", b"2"),
                    2,
                    PEER.node,
                ),
            )
        )
        await runner.send_channel.send(
            _call(runner, Deliver(b"\x09" * 16, PEER.node, Channel.USER, b"garbage", 2, PEER.node))
        )
        await trio.sleep(0.01)
        got = [events.receive_nowait() for _ in range(2)]
        assert [(ev, d["name"], d["payload"], d["origin"]) for ev, d in got] == [
            ("user", "a", b"1", ME.node.hex()),
            ("user", "b", b"2", PEER.node.hex()),
        ]
        assert runner.counters["user_event_drop_malformed"] == 1
        assert runner.counters["mesh_delivered_user"] == 2

    await run_briefly(runner, body)


def _call(runner: Any, d: Any) -> Any:
    from peerd.shell.runner import Call

    return Call(lambda: runner._deliver(d))


async def test_a_real_peer_in_the_runner(autojump_clock: trio.testing.MockClock) -> None:
    # The daemon's Peer (mesh and names): started alone it enters the mesh
    # alone (its timers on the runner's heap); a message to a local name goes
    # to the holder's API connection, the sender hears "delivered".
    peer = Peer(
        node_id=ME.node,
        name=ME.name,
        addr=ME.addr,
        config=SwimConfig(),
        rng=random.Random(1),
        generation=1,
        mesh=mesh_local(),
        names=NamesConfig(send_timeout_s=3),
        mesh_rng=random.Random(2),
        names_rng=random.Random(3),
    )
    links = FakeLinks()
    runner, _, _ = make_runner(peer, links=links)  # type: ignore[arg-type]

    class Conn:
        closed = False
        cred = None
        on_mail = None

        def __init__(self, cid: int) -> None:
            self.id = cid
            self.events: list[Any] = []

        def offer(self, stream: int, event: str, data: dict[str, Any]) -> str:
            self.events.append((event, data))
            return "ok"

    holder, sender = Conn(1), Conn(2)

    async def body() -> None:
        assert any(isinstance(t, MeshTimer) for _, _, t in runner._timers)
        await runner.call(holder, "register", {"name": "db"})
        assert await runner.call(sender, "send", {"name": "db", "payload": b"ping"}) == {
            "delivered": 1
        }
        assert [(e, d["payload"]) for e, d in holder.events] == [("message", b"ping")]
        with pytest.raises(Exception) as e:
            await runner.call(sender, "send", {"name": "nobody", "payload": b""})
        assert getattr(e.value, "code", None) == "not_found"
        status = await runner.call(sender, "status", {})
        assert status["counters"]["message_delivered"] == 1
        assert "mesh_active" not in status["gauges"]  # the agent adds those

    await run_briefly(runner, body)
