"""Anti-entropy of the registry, and pulls of what a node knows it lacks.

Epidemic dissemination reaches every node with high probability, not
certainty; anti-entropy makes it certain in the end (Demers et al., "Epidemic
algorithms for replicated database maintenance", 1987: rumor mongering backed
by anti-entropy). Every node compares its registry with one random live peer
every SYNC_INTERVAL_S, after each membership push-pull, and once shortly
after a partition heals; it sends its digest (one row per origin: generation
and version) while there are few origins, and above that bucket hashes of
the digest, so that only the rows of buckets that differ follow. Each side
then sends the other the deltas or snapshots it lacks. A digest row that
shows our own partition at a version doubles as an acknowledgement for
settled waits.

A node that learns it is behind on an origin (a gap in a delta, an
announcement of a newer version, a newer row in a digest) pulls the
difference over a stream: from whoever told it, else from the origin, one
pull in flight at a time, each origin retried a bounded number of times.
"""

from __future__ import annotations

import math

from peerd.core.digest import FINE_BITS, bucket_of
from peerd.core.registry.base import RegistryBase
from peerd.core.registry.config import (
    FULL_DIGEST_MAX,
    HEAL_SYNC_DELAY_S,
    ORIGINS_PER_BUCKET,
    SYNC_INTERVAL_S,
)
from peerd.core.registry.state import Applied
from peerd.core.timers import RegSyncTick
from peerd.wire import codec
from peerd.wire.messages import (
    NodeId,
    RegAck,
    RegDelta,
    RegDigestRow,
    RegSnapshot,
    RegSync,
)

# (The tuning is peerd.core.registry.config's; these are its defaults.)
__all__ = [
    "FULL_DIGEST_MAX",
    "HEAL_SYNC_DELAY_S",
    "ORIGINS_PER_BUCKET",
    "SYNC_INTERVAL_S",
    "RegistrySync",
    "sync_bits",
]


def sync_bits(origins: int, per_bucket: int = ORIGINS_PER_BUCKET) -> int:
    """Bucket bits of a hashed sync over ``origins`` origins."""
    if origins <= per_bucket:
        return 0
    return min(FINE_BITS, math.ceil(math.log2(origins / per_bucket)))


class RegistrySync(RegistryBase):
    """Anti-entropy rounds and pulls (see the module docstring)."""

    # --- pulls: what we know we lack ----------------------------------------------

    def _want(
        self,
        src_node: NodeId | None,
        origin: NodeId,
        generation: int,
        version: int,
        pull: bool = True,
    ) -> None:
        gen, have = self.state.version_of(origin)
        if (generation, version) <= (gen, have):
            return
        old = self._wants.get(origin)
        if old is None or (generation, version) > old[:2]:
            self._wants[origin] = (generation, version, src_node, 0)
        if pull:
            self._pull_next()

    def _pull_next(self) -> None:
        # Pull from the origin (or whoever told us) what we know we lack.
        if self._pull_from is not None or not self._wants:
            return
        me = self.node_id
        known = self._known
        for origin, (gen, version, src, tries) in list(self._wants.items()):
            if (gen, version) <= self.state.version_of(origin) or tries >= 3:
                del self._wants[origin]
                continue
            # Whoever told us holds it; else its origin, the one writer.
            target = (
                src
                if src is not None and src != me and known(src)
                else (origin if known(origin) else None)
            )
            if target is None:
                del self._wants[origin]
                continue
            self._wants[origin] = (gen, version, src, tries + 1)
            self._pull_from = target
            ask = sorted({origin, *(o for o, w in self._wants.items() if w[2] == target)})
            self._pull(target, self.sync_request(ask))
            return

    # --- anti-entropy -------------------------------------------------------------

    def sync_request(self, origins: list[NodeId] | None = None) -> RegSync:
        """Open an exchange: our whole digest while it is small; else its
        bucket hashes, or, to pull what we lack of ``origins``, our digest
        of just their buckets."""
        n = self.state.origins()
        if n <= self.config.full_digest_max:
            return RegSync(_rows(self.state.digest()), ())
        bits = sync_bits(n, self.config.origins_per_bucket)
        if origins is None:
            return RegSync((), (), bits, (), self.state.bucket_hashes().hashes(bits))
        buckets = tuple(sorted({bucket_of(o, bits) for o in origins}))
        return RegSync(_rows(self.state.digest_in(bits, buckets)), (), bits, buckets)

    def sync_tick(self, peer: NodeId | None = None) -> None:
        """The periodic round (``peer`` None): compare with one random live
        peer. With ``peer``: the one-off round after a partition healed."""
        if peer is not None:
            self._heal_peer = None
            if self._known(peer):
                self._pull(peer, self.sync_request())
            return
        self._sync_armed = False
        self.arm_sync()
        if self.state.origins() == 1 and not self.state.local.entries:
            return  # nothing to offer: peers holding entries will call on us
        if self._pull_from is not None:
            return  # a pull is repairing already; the next round will check
        peer = self._random_peer()
        if peer is not None:
            self._pull(peer, self.sync_request())

    def sync_soon(self) -> None:
        """One extra round shortly, with a random peer (we just joined the
        mesh: broadcasts sent before that did not reach us)."""
        peer = self._random_peer()
        if peer is not None:
            self._one_round_soon(peer)

    def _one_round_soon(self, peer: NodeId) -> None:
        """One extra round with ``peer`` shortly (at most one pending, and
        only once rounds run: an empty registry has nothing to compare)."""
        if self._heal_peer is None and self._sync_armed:
            self._heal_peer = peer
            self._arm(RegSyncTick, self.config.heal_sync_delay_s, peer)

    def arm_sync(self) -> None:
        """Start the periodic rounds, once this node holds or heard of any
        registry data (an empty registry has nothing to compare: peers that
        hold entries call on it)."""
        if not self._sync_armed:
            self._sync_armed = True
            self._arm(RegSyncTick, self.config.sync_interval_s, None)

    def missing_for(
        self,
        digest: tuple[RegDigestRow, ...],
        peer: NodeId | None = None,
        ours: dict[NodeId, tuple[int, int]] | None = None,
    ) -> tuple[RegDelta | RegSnapshot, ...]:
        """What a peer with ``digest`` lacks of what we hold (of ``ours``: our
        digest, or the part of it that ``digest`` covers). Never the
        peer's own partition (``peer``): it is the one writer of it, and its
        digest only looks behind ours because it was taken earlier."""
        theirs = {r.origin: (r.generation, r.version) for r in digest}
        items: list[RegDelta | RegSnapshot] = []
        if ours is None:
            ours = self.state.digest()
        for origin, (gen, version) in ours.items():
            if origin == peer:
                continue
            have = theirs.get(origin)
            if have is not None and have >= (gen, version):
                continue
            if origin == self.node_id and have is not None and have[0] == gen:
                items.append(self.state.delta_since(have[1]))
            elif version > 0 or origin != self.node_id:
                items.append(self.state.snapshot(origin))
        return tuple(items)

    def on_sync_request(self, src_node: NodeId | None, req: RegSync) -> RegSync:
        """Answer a peer's sync: apply what it pushed, reply with our digest
        (of the buckets that differ, or that it covered) and what it lacks."""
        self._apply_items(req.items)
        if req.hashes:
            differ = tuple(self.state.bucket_hashes().differing(req.bits, req.hashes))
            mine = self.state.digest_in(req.bits, differ) if differ else {}
            return RegSync(_rows(mine), (), req.bits, differ)
        if src_node is not None:
            self._acks_from_digest(src_node, req.digest)
        if req.bits >= 0:
            mine = self.state.digest_in(req.bits, req.buckets)
            return RegSync(
                _rows(mine), self.missing_for(req.digest, src_node, mine), req.bits, req.buckets
            )
        return RegSync(_rows(self.state.digest()), self.missing_for(req.digest, src_node))

    def on_sync_reply(self, src_node: NodeId | None, reply: RegSync) -> RegSync | None:
        """Apply a sync reply; returns a push of what the peer lacks, if any.
        What the peer holds newer and did not send (a reply to bucket
        hashes carries rows only) is pulled next."""
        self._apply_items(reply.items)
        self._pull_done(src_node)
        if src_node is not None:
            self._acks_from_digest(src_node, reply.digest)
        ours = None
        if reply.bits >= 0:
            ours = self.state.digest_in(reply.bits, reply.buckets)
            for row in reply.digest:
                if row.origin != self.node_id and self._known(row.origin):
                    self._want(src_node, row.origin, row.generation, row.version, pull=False)
        self._pull_next()  # once: what one peer has newer goes in one request
        missing = self.missing_for(reply.digest, src_node, ours)
        return RegSync((), missing) if missing else None

    def sync_failed(self, peer: NodeId | None) -> None:
        """A sync exchange with ``peer`` failed."""
        self._pull_done(peer)
        self._pull_next()

    def _pull_done(self, peer: NodeId | None) -> None:
        """An exchange with ``peer`` ended: if our pull went there, or to a
        node no longer known (nobody will answer it), the pull is over."""
        pulled = self._pull_from
        if pulled is not None and (peer == pulled or not self._known(pulled)):
            self._pull_from = None

    def _apply_items(self, items: tuple[RegDelta | RegSnapshot, ...]) -> None:
        if items:
            self.arm_sync()
        advanced: set[NodeId] = set()
        for item in items:
            if not self._known(item.origin):
                self.counters["drop.origin_not_live"] += 1  # see _known
                continue
            if isinstance(item, RegSnapshot):
                res = self.state.apply_snapshot(item)
            else:
                res = self.state.apply_delta(item)
            if res is Applied.APPLIED:
                advanced.add(item.origin)
        if not advanced:
            return
        self._emit_changes()
        if self.via_mesh:
            return  # the mesh carried it to the others (or their rounds will)
        # Keep the epidemic going: what we just pulled, others may lack too.
        for origin in sorted(advanced):
            gen, version = self.state.version_of(origin)
            self._gossip(("r", origin), codec.encode(RegAck(origin, gen, version)))
        self._flush_soon()

    def _acks_from_digest(self, node: NodeId, digest: tuple[RegDigestRow, ...]) -> None:
        for row in digest:
            if row.origin == self.node_id and row.generation == self.state.generation:
                self._acked(node, row.version)


def _rows(digest: dict[NodeId, tuple[int, int]]) -> tuple[RegDigestRow, ...]:
    return tuple(RegDigestRow(o, g, v) for o, (g, v) in digest.items())
