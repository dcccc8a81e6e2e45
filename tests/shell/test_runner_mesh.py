"""The runner's composition with the partial mesh: a fake mesh core and a
fake link manager record what the runner feeds and carries out (mock clock)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from peerd.core.events import EventKind, Input, JoinDone, MemberEvent, Output, Start
from peerd.core.mesh.events import (
    CloseLink,
    Connect,
    JoinMesh,
    LeaveMesh,
    LinkDown,
    MembershipHint,
    MeshInput,
    MeshOutput,
    MeshTimer,
    MeshTimerFired,
    MeshTimerKind,
    MessageIn,
    Send,
    SetMeshTimer,
)
from peerd.shell.links import LinkLost, LinkMessages
from peerd.shell.runner import CoreFailure
from peerd.wire.messages import Ack, MeshPeer, NeighborReply, Status
from tests.shell.test_runner import ME, PEER, FakeCore, make_runner

PEER_MP = MeshPeer(PEER.node, PEER.addr)


class FakeMesh:
    def __init__(self, script: Any = None) -> None:
        self.seen: list[tuple[float, MeshInput]] = []
        self.script = script or (lambda now, inp: [])

    def handle(self, now: float, inp: MeshInput) -> list[MeshOutput]:
        self.seen.append((now, inp))
        return list(self.script(now, inp))

    def of(self, kind: type) -> list[Any]:
        return [i for _, i in self.seen if isinstance(i, kind)]


class FakeLinks:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def has(self, peer: bytes) -> bool:
        return False

    def link_id(self, peer: bytes) -> int | None:
        return None

    def connect(self, peer: bytes, addr: Any, *, mesh: bool = True) -> None:
        self.calls.append(("connect", peer, addr, mesh))

    def send(self, peer: bytes, msg: Any, priority: int = 0, *, mesh: bool | None = None) -> bool:
        self.calls.append(("send", peer, msg, priority, mesh))
        return True

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


async def test_join_and_member_events_feed_the_mesh(autojump_clock: trio.testing.MockClock) -> None:
    def script(now: float, inp: Input) -> list[Output]:
        if isinstance(inp, Start):
            return [MemberEvent(EventKind.JOINED, PEER), JoinDone(1, 0)]
        return []

    core = FakeCore(script)
    mesh = FakeMesh()
    runner, _, _ = make_runner(core, mesh=mesh, links=FakeLinks())

    async def body() -> None:
        # Each JoinDone (the Start's, then the script's) joins the mesh
        # through the live SWIM members; the alive member was hinted.
        assert mesh.of(JoinMesh) == [JoinMesh((PEER_MP,))] * 2
        assert MembershipHint(alive=(PEER_MP,)) in mesh.of(MembershipHint)

    await run_briefly(runner, body)
    # The leave told the mesh.
    assert mesh.of(LeaveMesh) == [LeaveMesh()]


async def test_dead_member_is_hinted_dead(autojump_clock: trio.testing.MockClock) -> None:
    from peerd.core.events import MemberInfo

    dead = MemberInfo(PEER.node, "peer", PEER.addr, Status.DEAD, 3, 1, ())
    core = FakeCore(
        lambda now, inp: [MemberEvent(EventKind.DEAD, dead)] if isinstance(inp, Start) else []
    )
    mesh = FakeMesh()
    runner, _, _ = make_runner(core, mesh=mesh, links=FakeLinks())

    async def body() -> None:
        assert MembershipHint(dead=(PEER.node,)) in mesh.of(MembershipHint)

    await run_briefly(runner, body)


async def test_mesh_timers_share_the_deadline_heap(autojump_clock: trio.testing.MockClock) -> None:
    t0 = trio.current_time()
    timer = MeshTimer(MeshTimerKind.SHUFFLE, 7)

    def script(now: float, inp: MeshInput) -> list[MeshOutput]:
        if isinstance(inp, JoinMesh):
            return [SetMeshTimer(t0 + 5, timer)]
        return []

    mesh = FakeMesh(script)
    runner, _, _ = make_runner(FakeCore(), mesh=mesh, links=FakeLinks())

    async def body() -> None:
        await trio.sleep(10)
        fired = [(round(t - t0, 6), i) for t, i in mesh.seen if isinstance(i, MeshTimerFired)]
        assert fired == [(5, MeshTimerFired(timer))]

    await run_briefly(runner, body)


async def test_link_outputs_and_inputs(autojump_clock: trio.testing.MockClock) -> None:
    def script(now: float, inp: MeshInput) -> list[MeshOutput]:
        if isinstance(inp, JoinMesh):
            return [Connect(PEER_MP), Send(PEER.node, NeighborReply(True), 2), CloseLink(PEER.node)]
        return []

    mesh = FakeMesh(script)
    links = FakeLinks()
    runner, _, _ = make_runner(FakeCore(), mesh=mesh, links=links)

    async def body() -> None:
        assert links.calls == [
            ("connect", PEER.node, PEER.addr, True),
            ("send", PEER.node, NeighborReply(True), 2, True),
            ("close", PEER.node, True),
        ]
        await runner.send_channel.send(LinkMessages(PEER.node, (NeighborReply(False), Ack(1))))
        await runner.send_channel.send(LinkLost(PEER.node, True))
        await runner.send_channel.send(LinkLost(b"\x09" * 16, False))
        await trio.sleep(0.01)
        assert mesh.of(MessageIn) == [MessageIn(PEER.node, NeighborReply(False))]
        # Only the mesh's links become LinkDown; a stray message is counted.
        assert mesh.of(LinkDown) == [LinkDown(PEER.node)]
        assert runner.counters["link_drop_unexpected"] == 1

    await run_briefly(runner, body)


async def test_a_lost_mesh_link_is_released_before_the_mesh_hears_link_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The link manager clears the mesh's mark on a newer link to the node
    # (peerd.shell.links.LinkManager.mesh_lost) before the mesh hears
    # LinkDown, so what the mesh asks for in answer (Connect) stands.
    links = FakeLinks()
    at_link_down: list[Any] = []

    def script(now: float, inp: MeshInput) -> list[MeshOutput]:
        if isinstance(inp, LinkDown):
            at_link_down.append(links.calls[-1])
        return []

    runner, _, _ = make_runner(FakeCore(), mesh=FakeMesh(script), links=links)

    async def body() -> None:
        await runner.send_channel.send(LinkLost(PEER.node, True, 7))
        await runner.send_channel.send(LinkLost(PEER.node, False, 8))
        await trio.sleep(0.01)
        assert at_link_down == [("mesh_lost", PEER.node, 7)]
        assert [c for c in links.calls if c[0] == "mesh_lost"] == [("mesh_lost", PEER.node, 7)]

    await run_briefly(runner, body)


async def test_a_raising_mesh_is_a_core_failure(autojump_clock: trio.testing.MockClock) -> None:
    def script(now: float, inp: MeshInput) -> list[MeshOutput]:
        raise RuntimeError("boom")

    runner, _, _ = make_runner(FakeCore(), mesh=FakeMesh(script), links=FakeLinks())
    with pytest.raises(CoreFailure):
        await runner.run()
    assert ME is not None


async def test_user_events_go_to_event_watchers(autojump_clock: trio.testing.MockClock) -> None:
    from peerd.api.protocol import encode_user_event
    from peerd.core.mesh.events import Broadcast, BroadcastResult, Deliver
    from peerd.wire.messages import Channel

    def script(now: float, inp: MeshInput) -> list[MeshOutput]:
        if isinstance(inp, Broadcast):
            assert inp.channel is Channel.USER
            if len(inp.payload) > 100:
                return [BroadcastResult(inp.ref, error=("rate_limited", "slow down"))]
            return [BroadcastResult(inp.ref, id=b"\x07" * 16)]
        return []

    mesh = FakeMesh(script)
    runner, _, _ = make_runner(FakeCore(), mesh=mesh, links=FakeLinks())

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

    await run_briefly(runner, body)


def _call(runner: Any, d: Any) -> Any:
    from peerd.shell.runner import Call

    return Call(lambda: runner._deliver(d))


async def test_a_dead_member_closes_direct_links_and_fails_waiting_sends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from peerd.core.events import MemberInfo

    dead = MemberInfo(PEER.node, "peer", PEER.addr, Status.DEAD, 3, 1, ())
    links = FakeLinks()
    core = FakeCore(
        lambda now, inp: [MemberEvent(EventKind.DEAD, dead)] if isinstance(inp, Start) else []
    )
    runner, _, _ = make_runner(core, mesh=FakeMesh(), links=links)
    lost: list[bytes] = []
    assert runner.messenger is not None
    runner.messenger.link_lost = (  # type: ignore[method-assign]
        lambda node, link=None: lost.append(node)
    )

    async def body() -> None:
        assert ("close", PEER.node, False) in links.calls
        assert lost == [PEER.node]

    await run_briefly(runner, body)
