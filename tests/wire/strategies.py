"""Hypothesis strategies for wire messages, kept within the codec's limits."""

from __future__ import annotations

from hypothesis import strategies as st

from peerd.wire import codec
from peerd.wire.messages import (
    MESSAGE_ID_BYTES,
    NODE_ID_BYTES,
    Ack,
    Addr,
    Alive,
    Channel,
    Dead,
    Died,
    DiedRef,
    Disconnect,
    ForwardJoin,
    Gossip,
    GossipControl,
    IHave,
    KeyOp,
    KeyReply,
    KeyRequest,
    KeyStatus,
    Left,
    MemberState,
    MeshJoin,
    MeshPeer,
    Message,
    Nack,
    NameMsg,
    NameReply,
    NameStatus,
    Neighbor,
    NeighborReply,
    Ping,
    PingReq,
    PushPull,
    RegAck,
    RegChange,
    RegDelta,
    RegDigestRow,
    RegEntry,
    RegKind,
    RegSnapshot,
    RegSync,
    Shuffle,
    ShuffleReply,
    Status,
    Suspect,
    SyncDigest,
    SyncRows,
    Tags,
    TreeLink,
    tags_from_mapping,
)

u64 = st.integers(min_value=0, max_value=codec.MAX_U64)
node_ids = st.binary(min_size=NODE_ID_BYTES, max_size=NODE_ID_BYTES)


def _utf8_at_most(n: int) -> st.SearchStrategy[str]:
    return st.text(max_size=n).filter(lambda s: len(s.encode("utf-8")) <= n)


names = st.one_of(
    _utf8_at_most(codec.MAX_NAME_BYTES),
    st.text(alphabet="abc-", min_size=250, max_size=codec.MAX_NAME_BYTES),
)
addrs: st.SearchStrategy[Addr] = st.tuples(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str),
    st.integers(min_value=0, max_value=65535),
)
tags: st.SearchStrategy[Tags] = st.dictionaries(
    _utf8_at_most(codec.MAX_TAG_KEY_BYTES),
    st.text(max_size=40),
    max_size=6,
).map(tags_from_mapping)
statuses = st.sampled_from(Status)
members = st.builds(MemberState, node_ids, names, addrs, u64, u64, tags, statuses)

pings = st.builds(Ping, u64, node_ids)
ping_reqs = st.builds(PingReq, u64, node_ids, addrs, st.booleans())
acks = st.builds(Ack, u64)
nacks = st.builds(Nack, u64)
alives = st.builds(Alive, node_ids, names, addrs, u64, u64, tags)
suspects = st.builds(Suspect, node_ids, u64, node_ids)
deads = st.builds(Dead, node_ids, u64, node_ids)
dieds = st.builds(Died, node_ids, u64)
died_refs = st.builds(DiedRef, st.binary(min_size=8, max_size=8), u64)
lefts = st.builds(Left, node_ids, u64)
push_pulls = st.builds(PushPull, st.booleans(), st.lists(members, max_size=4).map(tuple))
sync_digests = st.integers(0, 12).flatmap(
    lambda b: st.builds(SyncDigest, st.just(b), st.binary(min_size=4 << b, max_size=4 << b))
)
sync_rows = st.integers(0, 12).flatmap(
    lambda b: st.builds(
        SyncRows,
        st.just(b),
        st.lists(st.integers(0, (1 << b) - 1), max_size=4).map(tuple),
        st.lists(members, max_size=3).map(tuple),
    )
)

reg_entries = st.builds(
    RegEntry,
    u64,
    st.sampled_from(RegKind),
    _utf8_at_most(codec.MAX_SCOPE_BYTES),
    _utf8_at_most(codec.MAX_REG_NAME_BYTES),
    u64,
    u64,
    u64,
    tags,
)
reg_changes = st.one_of(
    st.builds(lambda v, e: RegChange(v, e.eid, e), u64, reg_entries),
    st.builds(RegChange, u64, u64, st.none()),
)
reg_deltas = st.builds(
    lambda o, g, b, n, cs, a: RegDelta(o, g, b, b + n, cs, a),
    node_ids,
    u64,
    st.integers(0, 2**62),
    st.integers(0, 2**62),
    st.lists(reg_changes, max_size=3).map(tuple),
    st.booleans(),
)
reg_snapshots = st.builds(
    RegSnapshot, node_ids, u64, u64, st.lists(reg_entries, max_size=3).map(tuple)
)
reg_syncs = st.builds(
    RegSync,
    st.lists(st.builds(RegDigestRow, node_ids, u64, u64), max_size=3).map(tuple),
    st.lists(st.one_of(reg_deltas, reg_snapshots), max_size=2).map(tuple),
)
reg_acks = st.builds(RegAck, node_ids, u64, u64)

mesh_peers = st.builds(MeshPeer, node_ids, addrs)
ttls = st.integers(min_value=0, max_value=codec.MAX_WALK_TTL)
peer_lists = st.lists(mesh_peers, max_size=6).map(tuple)
msg_ids = st.binary(min_size=MESSAGE_ID_BYTES, max_size=MESSAGE_ID_BYTES)
mesh_joins = st.builds(MeshJoin, mesh_peers)
forward_joins = st.builds(ForwardJoin, mesh_peers, ttls)
neighbors = st.builds(Neighbor, mesh_peers, st.booleans())
neighbor_replies = st.builds(NeighborReply, st.booleans())
disconnects = st.builds(Disconnect, st.booleans())
shuffles = st.builds(Shuffle, mesh_peers, ttls, peer_lists)
shuffle_replies = st.builds(ShuffleReply, peer_lists)
gossips = st.builds(
    Gossip, msg_ids, node_ids, u64, st.sampled_from(Channel), st.binary(max_size=64)
)
gossip_controls = st.builds(
    GossipControl,
    st.lists(st.builds(IHave, msg_ids, u64), max_size=4).map(tuple),
    st.lists(msg_ids, max_size=3).map(tuple),
    st.sampled_from(TreeLink),
)
name_msgs = st.builds(
    NameMsg,
    u64,
    st.sampled_from(RegKind),
    _utf8_at_most(codec.MAX_SCOPE_BYTES),
    _utf8_at_most(codec.MAX_REG_NAME_BYTES),
    u64,
    _utf8_at_most(codec.MAX_REG_NAME_BYTES),
    st.binary(max_size=64),
    u64,
    u64,
    _utf8_at_most(codec.MAX_SCOPE_BYTES),
    u64,
    u64,
    u64,
)
name_replies = st.builds(NameReply, u64, st.sampled_from(NameStatus))
key_ids = st.binary(min_size=4, max_size=4)
key_requests = st.one_of(
    st.just(KeyRequest(KeyOp.QUERY, b"")),
    st.builds(KeyRequest, st.just(KeyOp.INSTALL), st.binary(min_size=32, max_size=32)),
    st.builds(KeyRequest, st.sampled_from([KeyOp.USE, KeyOp.REMOVE]), key_ids),
)
key_replies = st.builds(
    KeyReply,
    st.sampled_from(KeyStatus),
    st.one_of(st.just(b""), key_ids),
    st.lists(key_ids, max_size=5).map(tuple),
    _utf8_at_most(codec.MAX_KEY_MESSAGE_BYTES),
)

BY_TYPE: dict[int, st.SearchStrategy[Message]] = {
    Ping.TYPE: pings,
    PingReq.TYPE: ping_reqs,
    Ack.TYPE: acks,
    Nack.TYPE: nacks,
    Alive.TYPE: alives,
    Suspect.TYPE: suspects,
    Dead.TYPE: deads,
    Died.TYPE: dieds,
    DiedRef.TYPE: died_refs,
    Left.TYPE: lefts,
    PushPull.TYPE: push_pulls,
    SyncDigest.TYPE: sync_digests,
    SyncRows.TYPE: sync_rows,
    RegDelta.TYPE: reg_deltas,
    RegSnapshot.TYPE: reg_snapshots,
    RegSync.TYPE: reg_syncs,
    RegAck.TYPE: reg_acks,
    MeshJoin.TYPE: mesh_joins,
    ForwardJoin.TYPE: forward_joins,
    Neighbor.TYPE: neighbors,
    NeighborReply.TYPE: neighbor_replies,
    Disconnect.TYPE: disconnects,
    Shuffle.TYPE: shuffles,
    ShuffleReply.TYPE: shuffle_replies,
    Gossip.TYPE: gossips,
    GossipControl.TYPE: gossip_controls,
    NameMsg.TYPE: name_msgs,
    NameReply.TYPE: name_replies,
    KeyRequest.TYPE: key_requests,
    KeyReply.TYPE: key_replies,
}
messages: st.SearchStrategy[Message] = st.one_of(*BY_TYPE.values())
