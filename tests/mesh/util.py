"""Helpers for exact-output tests of the mesh cores.

Conventions (as in tests/core/util.py): node ``i`` has id ``i`` as a 16-byte
big-endian integer and address ``10.0.<i//256>.<i%256>:7946``; the node under
test is node 1. A :class:`Rig` wraps one core (HyParView, Plumtree or Mesh),
passes explicit ``now`` values and remembers the timers it armed, so a test
can fire "the SHUFFLE timer" without digging through earlier outputs.
Messages from peers go through the real codec.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from peerd.core.events import (
    Log,
    MeshInput,
    MeshOutput,
    MeshTimerFired,
    MeshTimerKind,
    MessageIn,
    NeighborUp,
    SetMeshTimer,
)
from peerd.core.mesh.config import HyParViewConfig, MeshConfig, PlumtreeConfig
from peerd.core.mesh.hyparview import HyParView
from peerd.core.mesh.mesh import Mesh
from peerd.core.mesh.plumtree import Plumtree
from peerd.wire import codec
from peerd.wire.messages import MeshPeer, Message, NodeId

from .driver import nid as nid
from .driver import peer as peer

T = TypeVar("T")


def hv_cfg(**changes: Any) -> HyParViewConfig:
    """Small views so that full-view cases are cheap to set up."""
    base = HyParViewConfig(
        active_size=3,
        passive_size=4,
        arwl=4,
        prwl=2,
        shuffle_interval_s=10.0,
        shuffle_active=1,
        shuffle_passive=2,
        neighbor_timeout_s=3.0,
        reject_cooldown_s=10.0,
    )
    return base.replace(**changes)


def pt_cfg(**changes: Any) -> PlumtreeConfig:
    return PlumtreeConfig().replace(**changes)


def of(outs: Iterable[object], kind: type[T]) -> list[T]:
    return [o for o in outs if isinstance(o, kind)]


def one(outs: Iterable[object], kind: type[T]) -> T:
    found = of(outs, kind)
    assert len(found) == 1, f"expected exactly one {kind.__name__}, got {found!r}"
    return found[0]


def nologs(outs: Iterable[MeshOutput]) -> list[MeshOutput]:
    return [o for o in outs if not isinstance(o, Log)]


def notimers(outs: Iterable[MeshOutput]) -> list[MeshOutput]:
    """``outs`` without logs and timers (tests check timers separately)."""
    return [o for o in outs if not isinstance(o, Log | SetMeshTimer)]


@dataclass
class Rig:
    core: Any  # HyParView | Plumtree | Mesh
    now: float = 0.0
    armed: list[SetMeshTimer] = field(default_factory=list)

    def handle(self, inp: MeshInput, now: float | None = None) -> list[MeshOutput]:
        if now is not None:
            self.now = now
        outs: list[MeshOutput] = self.core.handle(self.now, inp)
        self.armed.extend(of(outs, SetMeshTimer))
        return outs

    def recv(self, src: int, msg: Message, now: float | None = None) -> list[MeshOutput]:
        decoded = codec.decode(codec.encode(msg))
        return self.handle(MessageIn(nid(src), decoded), now)  # type: ignore[arg-type]

    def timers(self, kind: MeshTimerKind) -> list[SetMeshTimer]:
        return [t for t in self.armed if t.timer.kind is kind]

    def timer(self, kind: MeshTimerKind) -> SetMeshTimer:
        found = self.timers(kind)
        assert found, f"no {kind} timer armed"
        return found[-1]

    def fire(
        self, kind: MeshTimerKind | SetMeshTimer, now: float | None = None
    ) -> list[MeshOutput]:
        """Fire a timer (by default the newest of ``kind``) at its deadline."""
        t = kind if isinstance(kind, SetMeshTimer) else self.timer(kind)
        self.armed.remove(t)
        return self.handle(MeshTimerFired(t.timer), max(self.now, t.at) if now is None else now)

    def counter(self, key: str) -> int:
        return int(self.core.counters[key])


def hv_rig(config: HyParViewConfig | None = None, seed: int = 7) -> Rig:
    return Rig(HyParView(peer(1), config or hv_cfg(), random.Random(seed)))


def pt_rig(
    config: PlumtreeConfig | None = None,
    seed: int = 7,
    eager: Iterable[int] = (),
    lazy: Iterable[int] = (),
) -> Rig:
    """A Plumtree with ``eager`` neighbours (new links start eager) and
    ``lazy`` ones (pruned by a PRUNE from them)."""
    from peerd.wire.messages import GossipControl, TreeLink

    r = Rig(Plumtree(nid(1), config or pt_cfg(), random.Random(seed)))
    for i in (*eager, *lazy):
        r.handle(NeighborUp(peer(i)))
    for i in lazy:
        r.recv(i, GossipControl((), (), TreeLink.LAZY))
    return r


def mesh_rig(config: MeshConfig | None = None, seed: int = 7) -> Rig:
    return Rig(Mesh(peer(1), config or MeshConfig(hv_cfg(), pt_cfg()), random.Random(seed)))


def with_active(r: Rig, *ids: int) -> Rig:
    """Make ``ids`` neighbours of a HyParView rig the way the protocol does
    (they join through us), and forget the outputs."""
    from peerd.wire.messages import MeshJoin

    for i in ids:
        r.recv(i, MeshJoin(peer(i)))
    assert r.core.active_ids() == [nid(i) for i in ids]
    return r


def ids(nodes: Iterable[NodeId]) -> list[int]:
    return [int.from_bytes(n, "big") for n in nodes]


def peers(*ids_: int) -> tuple[MeshPeer, ...]:
    return tuple(peer(i) for i in ids_)
