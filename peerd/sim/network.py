"""The fake network: datagrams, streams, ICMP hints and watch links.

Theory of operation. The network carries the real encoded datagrams
(optionally really sealed and opened) with a latency drawn from the
scenario's distribution, a fixed per-link delay, loss, duplication,
reordering, an MTU, partitions and one-way blocks. A datagram to a host whose
daemon crashed (host still up) comes back as an ICMP port-unreachable hint,
and the host's kernel closes the watch links to it; a host crash
(``icmp = false``) and a pause produce neither. Streams (push-pull) are
reliable but blocked by partitions; they fail after the stream timeout when
the peer is silent. All randomness is drawn from the world's one network RNG,
in the order the heap delivers events.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass
from typing import Any

from peerd.core.events import (
    LinkClosed,
    OpenStream,
    PacketIn,
    StreamFailed,
    StreamReply,
    StreamRequest,
    StreamResponse,
    Unreachable,
)
from peerd.sim.engine import T_CTL, T_HOST, Host, Proc
from peerd.sim.measure import Measure
from peerd.sim.scenario import Scenario
from peerd.wire import seal as sealmod
from peerd.wire.messages import Addr

STREAM_FRAME_OVERHEAD = 4  # length prefix of a TCP frame


@dataclass(slots=True)
class Stream:
    opener: Proc
    stream: int
    server: Proc
    done: bool = False


class Network(Measure):
    def __init__(self, scenario: Scenario, *, progress: Any = None) -> None:
        super().__init__(scenario, progress=progress)
        # network
        net = scenario.network
        self.lat_min = net.latency.min_ms / 1000.0
        self.lat_span = (net.latency.max_ms - net.latency.min_ms) / 1000.0
        self.lat_exp = net.latency.dist == "exponential"
        self.loss = net.loss
        self.dup = net.duplicate
        self.reorder = net.reorder
        self.reorder_s = net.reorder_ms / 1000.0
        self.mtu = net.mtu
        self.seal = net.seal
        self.envelope = sealmod.SEALED_OVERHEAD  # counted even when not really sealing
        self.stream_timeout = net.stream_timeout_s
        self.link_s = net.link_ms / 1000.0
        self._link_salt = random.Random(f"peerd-sim-links:{scenario.seed}").getrandbits(32)
        self.group: list[int] | None = None  # partition group per host
        self.blocks: list[tuple[frozenset[int], frozenset[int]]] = []
        self.node_loss: dict[int, float] = {}
        self.netfaults = False
        self._keyring = (
            sealmod.Keyring([random.Random(f"peerd-sim-key:{scenario.seed}").randbytes(32)])
            if self.seal
            else None
        )
        self.streams: dict[int, Stream] = {}
        self._sid = 0

    def _latency(self) -> float:
        return self.latency_with(self.rng)

    def latency_with(self, rng: random.Random) -> float:
        """One datagram's latency (the network's distribution), drawn from ``rng``."""
        r = rng.random()
        if self.lat_exp:
            lat = self.lat_min - self.lat_span / 3 * math.log(1.0 - r)
            lat = min(lat, self.lat_min + 3 * self.lat_span)
        else:
            lat = self.lat_min + self.lat_span * r
        if self.reorder and rng.random() < self.reorder:
            lat += self.reorder_s
        return lat

    def link_delay(self, a: int, b: int) -> float:
        """The fixed extra delay of the link between hosts ``a`` and ``b``."""
        if not self.link_s:
            return 0.0
        lo, hi = (a, b) if a < b else (b, a)
        h = (lo * 0x9E3779B1 ^ hi * 0x85EBCA77 ^ self._link_salt) & 0xFFFFFFFF
        h = (h ^ (h >> 15)) * 0x2C1B3C6D & 0xFFFFFFFF
        return self.link_s * ((h ^ (h >> 12)) & 0xFFFF) / 0xFFFF

    def _open(self, proc: Proc, inp: PacketIn) -> PacketIn | None:
        assert proc.opener is not None
        try:
            _sender, payload = proc.opener.open(inp.data)
        except sealmod.SealError:
            self.counts["seal_rejected"] += 1
            return None
        return PacketIn(inp.src, payload)

    def _undeliverable(self, t: float, tgt: Any, inp: Any) -> None:
        kind = tgt.tkind
        if kind == T_CTL:
            inp()
            return
        if kind != T_HOST:
            return  # a timer or stream result of a process that is gone
        host: Host = tgt
        if inp.__class__ is PacketIn:
            # Nothing listens there. A live host answers with ICMP port unreachable.
            src = self.by_addr.get(inp.src)
            if (
                host.icmp
                and host.started
                and src is not None
                and src.cur is not None
                and not self._blocked(host.index, src.index)
            ):
                self.counts["unreachable_hints"] += 1
                self._push(t + self._latency(), src.cur, Unreachable(host.addr))

    def _send(self, proc: Proc, dst: Addr, data: bytes, t: float) -> None:
        host = self.by_addr.get(dst)
        counts = self.counts
        counts["datagrams"] += 1
        if proc.sealer is not None:
            data = proc.sealer.seal(data)
            size = len(data)
        else:
            size = len(data) + self.envelope
        sec = self._cur_sec
        sec[0] += 1
        sec[1] += size
        if host is None:
            counts["dropped_unknown_addr"] += 1
            return
        if size > self.mtu:
            counts["dropped_mtu"] += 1
            return
        loss = self.loss
        if self.netfaults:
            a, b = proc.host.index, host.index
            if self._blocked(a, b):
                counts["dropped_partition"] += 1
                return
            nl = self.node_loss
            if nl:
                keep = (1.0 - loss) * (1.0 - nl.get(a, 0.0)) * (1.0 - nl.get(b, 0.0))
                loss = 1.0 - keep
        rng = self.rng
        if loss and rng.random() < loss:
            counts["dropped_loss"] += 1
            return
        inp = PacketIn(proc.host.addr, data)
        if self.link_s:
            t += self.link_delay(proc.host.index, host.index)
        self._seq += 1
        heapq.heappush(self._heap, (t + self._latency(), self._seq, host, inp))
        if self.dup and rng.random() < self.dup:
            counts["duplicated"] += 1
            self._seq += 1
            heapq.heappush(self._heap, (t + self._latency(), self._seq, host, inp))

    def _blocked(self, a: int, b: int) -> bool:
        g = self.group
        if g is not None and g[a] != g[b]:
            return True
        return any(a in src and b in dst for src, dst in self.blocks)

    def _open_stream(self, proc: Proc, o: OpenStream, t: float) -> None:
        self.counts["streams"] += 1
        host = self.by_addr.get(o.dst)
        if (
            host is None
            or self._blocked(proc.host.index, host.index)
            or (host.cur is None and not (host.icmp and host.started))
        ):
            # Nobody answers the SYN: the connect times out.
            self.counts["streams_failed"] += 1
            self._push(
                t + min(5.0, self.stream_timeout), proc, StreamFailed(o.stream, "connect_timeout")
            )
            return
        if host.cur is None:
            self.counts["streams_failed"] += 1
            self._push(t + 2 * self._latency(), proc, StreamFailed(o.stream, "refused"))
            return
        # Connected: the request frame goes out.
        sec = self._cur_sec
        sec[2] += 1
        sec[3] += len(o.data) + self.envelope + STREAM_FRAME_OVERHEAD
        self._sid += 1
        sid = self._sid
        self.streams[sid] = Stream(proc, o.stream, host.cur)
        # SYN, SYN-ACK, then the request frame.
        self._push(t + 3 * self._latency(), host.cur, StreamRequest(sid, proc.host.addr, o.data))
        self.at(t + self.stream_timeout, lambda: self._stream_timeout(sid))

    def _stream_timeout(self, sid: int) -> None:
        st = self.streams.pop(sid, None)
        if st is None:
            return
        self.counts["streams_failed"] += 1
        if st.opener.cur is not None:
            self._push(self.now, st.opener, StreamFailed(st.stream, "timeout"))

    def _stream_reply(self, proc: Proc, o: StreamReply, t: float) -> None:
        st = self.streams.get(o.stream)
        if st is None or st.server is not proc:
            return
        if o.data is not None:
            sec = self._cur_sec
            sec[2] += 1
            sec[3] += len(o.data) + self.envelope + STREAM_FRAME_OVERHEAD
        if st.opener.cur is None or self._blocked(proc.host.index, st.opener.host.index):
            return  # the opener's timeout fails it
        del self.streams[o.stream]
        if o.data is None:
            self.counts["streams_failed"] += 1
            self._push(t + self._latency(), st.opener, StreamFailed(st.stream, "closed"))
        else:
            self._push(t + self._latency(), st.opener, StreamResponse(st.stream, o.data))

    def _watch(self, proc: Proc, addrs: tuple[Addr, ...], t: float) -> None:
        me = proc.host.index
        for a in proc.watching:
            h = self.by_addr.get(a)
            if h is not None and h.watchers.get(me) is proc:
                del h.watchers[me]
        proc.watching = addrs
        for a in addrs:
            h = self.by_addr.get(a)
            if h is None:
                continue
            h.watchers[me] = proc
            if h.cur is None and h.icmp and h.started and not self._blocked(me, h.index):
                # Connect refused: nothing listens there any more.
                self.counts["link_closed_hints"] += 1
                self._push(t + 2 * self._latency(), proc, LinkClosed(a))
