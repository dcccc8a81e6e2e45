"""The simulator drives the real core, not a re-implementation: a node driven
by the world and the same node driven directly, or by the daemon's runner
(peerd.shell.runner with a mock clock), given the same inputs at the same
times, return the same outputs, byte for byte."""

from __future__ import annotations

import io
import random
from typing import Any

import trio

from peerd.core.events import Input, Output, Start, TimerFired
from peerd.core.peer import Peer
from peerd.sim import store
from peerd.sim.world import World
from peerd.wire.messages import MemberState, Status

from .helpers import scenario

WATCHED = 3
UNTIL = 12.0


def _record() -> tuple[World, list[tuple[float, Input, list[Output]]]]:
    # (membership only: without the mesh the Peer is the bare membership node)
    sc = scenario(
        '[mesh]\nenabled = false\n[[fault]]\nat_s = 4\nkind = "crash"\nnodes = [5, 9]\n',
        nodes=12,
        duration=UNTIL,
    )
    w = World(sc)
    w.setup()
    proc = w.hosts[WATCHED].cur
    assert proc is not None
    log: list[tuple[float, Input, list[Output]]] = []
    orig = proc.node.handle

    def spy(now: float, inp: Input) -> list[Output]:
        outs = orig(now, inp)
        log.append((now, inp, list(outs)))
        return outs

    proc.node.handle = spy  # type: ignore[method-assign]
    w.run_until(UNTIL)
    return w, log


def _twin(w: World) -> Peer:
    """The watched node as the world built it: same id, config, RNG, members
    (a Peer: membership with its registry beside it, as every daemon runs)."""
    h = w.hosts[WATCHED]
    states = [
        MemberState(x.node_id, f"n{x.index}", x.addr, 0, 1, (), Status.ALIVE) for x in w.hosts
    ]
    return Peer(
        node_id=h.node_id,
        name=f"n{h.index}",
        addr=h.addr,
        config=w.cfg,
        rng=random.Random(f"peerd-sim-node:{w.sc.seed}:{h.index}:1"),
        generation=1,
        store=store.Snapshot(states).tables,
    )


def test_world_and_direct_driving_give_the_same_outputs() -> None:
    w, log = _record()
    assert any(type(o).__name__ == "SendPacket" for _t, _i, outs in log for o in outs)
    twin = _twin(w)
    for now, inp, outs in log:
        assert twin.handle(now, inp) == outs, (now, inp)


async def test_runner_and_world_give_the_same_outputs(autojump_clock: Any) -> None:
    from peerd.core.events import LogLevel
    from peerd.shell.logs import Logger
    from peerd.shell.runner import Runner

    w, log = _record()
    twin = _twin(w)
    seen: list[tuple[float, Input, list[Output]]] = []
    orig = twin.handle

    def spy(now: float, inp: Input) -> list[Output]:
        outs = orig(now, inp)
        seen.append((now, inp, list(outs)))
        return outs

    twin.handle = spy  # type: ignore[method-assign]

    class Ports:
        def send(self, dst: Any, payload: bytes) -> None: ...
        def open_stream(self, stream: int, dst: Any, data: bytes) -> None: ...
        def reply(self, stream: int, data: bytes | None) -> None: ...
        def set_watch_links(self, addrs: Any) -> None: ...

    ports = Ports()
    runner = Runner(
        twin,
        packets=ports,
        streams=ports,
        logger=Logger(LogLevel.ERROR, io.StringIO()),
        config=w.cfg,
    )
    # Everything but timers and Start comes from outside the core: feed it at
    # the time the world delivered it; the runner arms and fires the timers.
    feed = [(t, i) for t, i, _o in log if not isinstance(i, TimerFired | Start)]

    async def feeder() -> None:
        for t, inp in feed:
            await trio.sleep_until(t)
            await runner.send_channel.send(inp)  # type: ignore[arg-type]

    with trio.move_on_at(UNTIL - 0.001):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.run)
            nursery.start_soon(feeder)
    want = [e for e in log if e[0] < UNTIL - 0.001]
    assert len(seen) == len(want)
    for got, exp in zip(seen, want, strict=True):
        assert got == exp
