"""The simulated world: many cores over the engine, network, faults and
measurements, with the workloads the scenario asks for.

Theory of operation. :class:`World` is the composition: it builds the cores
(each process is one whole :class:`peerd.core.peer.Peer`, with the mesh when
the scenario has ``[mesh]`` and names messaging when it has a registry or
names workload, each with RNG streams of its own), preloads their shared
state at a large start, schedules faults and samples, and routes each output
a core produces to the layer that simulates its effect (network, peer links,
measurement or a workload). No protocol decision is made here: what joins
membership, registry, mesh and names is the Peer's. The layers it extends
(engine, measure, network, faults) each open with their own theory of
operation.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from typing import Any, cast

from peerd.core import events as nev
from peerd.core.events import (
    BroadcastResult,
    CloseLink,
    CommandResult,
    Connect,
    Deliver,
    IncarnationChanged,
    JoinDone,
    LeaveDone,
    Log,
    MemberEvent,
    NeighborDown,
    NeighborUp,
    OpenStream,
    RegistryEvent,
    Send,
    SendPacket,
    SetTimer,
    Start,
    StreamReply,
    TimerFired,
    WatchLinks,
)
from peerd.core.mesh.config import PRESETS as MESH_PRESETS
from peerd.core.names.core import NamesConfig
from peerd.core.peer import Peer
from peerd.core.swim.members import Member, MemberTables, StoreFactory
from peerd.sim import compact as compact_store
from peerd.sim import regshare, store
from peerd.sim.engine import Host, Proc
from peerd.sim.faults import Faults
from peerd.sim.links import Links
from peerd.sim.measure import V_ALIVE, Record
from peerd.sim.scenario import Scenario
from peerd.sim.spec import RegistrySpec
from peerd.sim.workloads.mesh import MeshWorld
from peerd.sim.workloads.names import NAMES_CHECKS, NameRecorder, NamesWorld
from peerd.sim.workloads.registry import RegistryWorld
from peerd.wire import seal as sealmod
from peerd.wire.messages import Addr, MemberState, Status


class World(Faults):
    def __init__(
        self,
        scenario: Scenario,
        *,
        progress: Callable[[World], None] | None = None,
        compact: bool = True,
    ) -> None:
        super().__init__(scenario, progress=progress)
        # Members tables of nodes that join share their records (see
        # peerd.sim.compact); compact=False gives them plain tables.
        self.records = compact_store.Records() if compact else None
        # and their registry replicas share equal partitions (peerd.sim.regshare)
        self.regpool = regshare.Pool() if compact else None
        ns = scenario.names
        regspec = scenario.registry
        if regspec is None and ns is not None and ns.names_per_node:
            # names of the workload's own, registered (preloaded) like a registry's
            regspec = RegistrySpec(names_per_node=ns.names_per_node)
        self.reg = RegistryWorld(self, regspec) if regspec else None
        # What each Peer runs besides membership: the mesh with [mesh], names
        # messaging with a registry or a names workload; then peer links.
        self.mesh_config = (
            MESH_PRESETS.get(scenario.preset, MESH_PRESETS["lan"])()
            if scenario.mesh.enabled
            else None
        )
        self.names_config = NamesConfig() if self.reg is not None or ns is not None else None
        if self.mesh_config is not None or self.names_config is not None:
            self.links = Links(self)
        self.mesh = MeshWorld(self, scenario.mesh) if scenario.mesh.enabled else None
        # The names workload: its measurement and its driver.
        self.names = (
            NameRecorder(
                ns.settle_s,
                ns.reply,
                [(e.after_s, e.until_s) for e in scenario.expects if e.check in NAMES_CHECKS],
            )
            if ns is not None
            else None
        )
        self.names_driver = (
            NamesWorld(self, ns, self.names, self.names_config.send_timeout_s)
            if ns is not None and self.names is not None and self.names_config is not None
            else None
        )

    # --- running ------------------------------------------------------------------------

    def setup(self) -> None:
        sc = self.sc
        k = sc.start_count()
        states = [
            MemberState(h.node_id, f"n{h.index}", h.addr, 0, 1, (), Status.ALIVE)
            for h in self.hosts[:k]
        ]
        snap = store.Snapshot(states)
        row = bytearray(self.n)
        row[:k] = b"\x01" * k  # V_ALIVE
        self.up[:k] = b"\x01" * k  # all of them run from t=0 (no transient wrong views)
        reg = self.reg
        reg_snap: store.SharedState | None = None
        owners: list[dict[int, int]] = []
        if reg is not None and reg.spec.preload:
            reg._quiet = True
            reg_snap, owners = reg.preload(k)
        for h in self.hosts[:k]:
            proc = self._start_proc(h, preload=snap, row=bytearray(row))
            if reg_snap is not None:
                proc.node.preload_registry(reg_snap.tables(h.node_id, proc.gen), owners[h.index])
                proc.flush = None  # its replica is the preloaded one: nothing to share after inputs
        if reg is not None:
            reg._quiet = False
            reg._changed(0.0)
            reg.start()
        if self.mesh is not None:
            self.mesh.schedule()
        if self.names_driver is not None:
            self.names_driver.schedule()
        for f in sc.faults:
            for r in range(f.repeat):
                t = f.at_s + r * f.every_s
                if t <= sc.duration_s:
                    self.at(t, self._fault_fn(f, r, t))
        step = sc.sample_s
        t = 0.0
        while t <= sc.duration_s + 1e-9:
            self.at(t, self._sample)
            t = round(t + step, 9)
        for s in range(1, int(math.ceil(sc.duration_s)) + 1):
            self.at(float(s), self._tick_second)

    def run(self) -> Record:
        self.setup()
        self.run_until(self.sc.duration_s)
        return self.finish()

    # --- outputs ------------------------------------------------------------------------

    def _carry_out(self, proc: Proc, outs: list[Any], t: float) -> None:
        for o in outs:
            c = o.__class__
            if c is SendPacket:
                self._send(proc, o.dst, o.data, t)
            elif c is SetTimer:
                self._seq += 1
                heapq.heappush(self._heap, (o.at, self._seq, proc, TimerFired(o.timer)))
            elif c is MemberEvent:
                self._on_event(proc, o, t)
            elif c is Log:
                continue
            elif c is IncarnationChanged:
                proc.host.inc = o.incarnation
            elif c is OpenStream:
                self._open_stream(proc, o, t)
            elif c is StreamReply:
                self._stream_reply(proc, o, t)
            elif c is WatchLinks:
                self._watch(proc, o.addrs, t)
            elif c is JoinDone:
                self.counts["joins_ok"] += o.ok
                self.counts["joins_failed"] += o.failed
            elif c is LeaveDone:
                self._stop(proc.host, icmp=True, reason="left")
            elif c is RegistryEvent:
                if self.reg is not None:
                    self.reg.on_event(proc, o, t)
            elif c is CommandResult:
                if self.reg is not None:
                    self.reg.on_result(proc, o, t)
            # peer links (the mesh's and messages to names)
            elif c is Send:
                self.links.send(proc.host.index, o.dst, o.msg, t)
            elif c is nev.LinkSend:
                ok, link = self.links.link_send(proc.host.index, o, t)
                if o.seq and (not ok or link != o.link):
                    self._push(t, proc, nev.LinkSendDone(o.seq, ok, link))
            elif c is Connect:
                self.links.connect(proc.host.index, o.peer.node, t)
            elif c is CloseLink:
                self.links.close(proc.host.index, o.node, o.mesh)
            # what the applications get
            elif c is nev.DeliverToConn or c is nev.SendResult:
                assert self.names_driver is not None  # (no names workload: no sends)
                self.names_driver.output(proc, o, t)
                if c is nev.DeliverToConn and o.answer is not None:
                    self.links.link_send(proc.host.index, o.answer, t)  # taken: answered
            elif c is Deliver:
                if self.mesh is not None:
                    self.mesh.delivered(proc, o, t)
            elif c is BroadcastResult:
                if self.mesh is not None:
                    self.mesh.result(o)
            elif c is NeighborUp or c is NeighborDown:
                continue

    def _start_proc(
        self,
        host: Host,
        preload: store.Snapshot | None = None,
        seeds: tuple[Addr, ...] = (),
        row: bytearray | None = None,
    ) -> Proc:
        t = self.now
        host.gen += 1
        gen = host.gen
        seed, i = self.sc.seed, host.index
        made: list[compact_store.CompactMembers] = []
        factory: StoreFactory | None = None
        if preload is not None:
            factory = preload.tables
        elif self.records is not None:
            records = self.records

            def factory(me: Member, rng: random.Random) -> MemberTables:
                tables = records.tables(me, rng)
                made.append(cast(compact_store.CompactMembers, tables.members))
                return tables

        node = Peer(
            store=factory,
            node_id=host.node_id,
            name=f"n{i}",
            addr=host.addr,
            config=self.cfg,
            rng=random.Random(f"peerd-sim-node:{seed}:{i}:{gen}"),
            incarnation=host.inc,
            generation=gen,
            mesh=self.mesh_config,
            names=self.names_config,
            mesh_rng=None
            if self.mesh_config is None
            else random.Random(f"peerd-sim-mesh-node:{seed}:{i}:{gen}"),
            names_rng=None
            if self.names_config is None
            else random.Random(f"peerd-sim-names-node:{seed}:{i}:{gen}"),
        )
        if row is None:
            row = bytearray(self.n)
        row[host.index] = V_ALIVE
        proc = Proc(host, node, gen)
        if self.regpool is not None:
            proc.flush = regshare.install(self.regpool, node, made[0].flush if made else None)
        elif made:
            proc.flush = made[0].flush
        if self.seal:
            assert self._keyring is not None
            nonce_rng = random.Random(f"peerd-sim-nonce:{self.sc.seed}:{host.index}:{gen}")
            proc.sealer = sealmod.Sealer(
                self._keyring, host.node_id, gen, nonce_source=nonce_rng.randbytes
            )
            proc.opener = sealmod.Opener(self._keyring)
        host.cur = proc
        host.started = True
        host.icmp = True
        self._account(t)
        self.running += 1
        self._set_truth(host.index, True, t)
        self._observer_on(
            host.index, row, t, exact_alive=self.sc.start_count() - 1 if preload is not None else -1
        )
        if self.reg is not None:
            self.reg.observer_on(host.index, preload is not None and self.reg.spec.preload, t)
        self._push(t, proc, Start(seeds))
        return proc

    def finish(self) -> Record:
        rec = self.rec
        rec.virtual_s = self.sc.duration_s
        self._account(self.sc.duration_s)
        rec.node_seconds = sum(rec.running_per_second)
        rec.counts = dict(self.counts)
        totals: dict[str, int] = {}
        for h in self.hosts:
            if h.cur is not None:
                self.count_copies(h.cur)
                for k, v in h.cur.node.counters.items():
                    totals[k] = totals.get(k, 0) + v
        rec.core_counters = dict(sorted(totals.items()))
        if self.mesh is not None:
            rec.mesh = self.mesh.summary()
            rec.mesh_records = list(self.mesh.broadcasts)
        if self.reg is not None:
            rec.registry = self.reg.finish()
            rec.registry_convergence = list(self.reg.convergence)
            rec.registry_evals = dict(self.reg.evals)
        if self.names is not None:
            assert self.names_driver is not None
            self.names_driver.finish()
            rec.names = self.names.finish(self.sc.duration_s)
            rec.names.update(self.names_driver.summary())
            rec.names_at = dict(self.names.totals)
        return rec
