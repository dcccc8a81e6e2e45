"""Wire codec of the partial-mesh family (types 30-38): HyParView's view
maintenance (join, forward-join random walks, neighbor requests and replies,
disconnect, shuffles) and Plumtree's broadcast (gossip carrying a payload on
the eager tree, gossip-control carrying lazy announcements, grafts and the
tree-link change).

The bounds here are the wire's, wider than any channel's: a walk's hops
left, a shuffle's peer sample, a gossip payload, and how many announcements
or wanted ids one control message may carry, so that one message cannot make
its receiver do unbounded work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from peerd.wire.codec_fields import (
    _addr_in,
    _addr_out,
    _array,
    _bad,
    _bad_out,
    _bool,
    _bool_out,
    _fields,
    _node_id,
    _node_out,
    _tuple_out,
    _uint,
    _uint_out,
)
from peerd.wire.messages import (
    MESSAGE_ID_BYTES,
    Channel,
    Disconnect,
    ForwardJoin,
    Gossip,
    GossipControl,
    IHave,
    MeshJoin,
    MeshPeer,
    Message,
    Neighbor,
    NeighborReply,
    Shuffle,
    ShuffleReply,
    TreeLink,
)

# Partial mesh (types 30-39).
MAX_WALK_TTL = 255  # random-walk hops left (forward-join, shuffle)
MAX_SHUFFLE_PEERS = 64
MAX_GOSSIP_PAYLOAD_BYTES = 1024 * 1024  # the wire bound; channels have smaller ones
MAX_IHAVE = 4096  # announcements in one gossip-control
MAX_WANT = 1024  # ids grafted in one gossip-control

_CHANNELS = frozenset(int(c) for c in Channel)
_TREE_LINKS = frozenset(int(t) for t in TreeLink)


# --- encoding ---


def _peer_out(p: Any, what: str) -> list[Any]:
    if type(p) is not MeshPeer:
        _bad_out(f"{what} must be a MeshPeer, got {p!r}")
    return [_node_out(p.node, f"{what} node"), _addr_out(p.addr)]


def _peers_out(v: Any) -> list[Any]:
    peers = _tuple_out(v, "peers")
    if len(peers) > MAX_SHUFFLE_PEERS:
        _bad_out(f"more than {MAX_SHUFFLE_PEERS} peers")
    return [_peer_out(p, "peer") for p in peers]


def _ttl_out(v: Any) -> int:
    if type(v) is not int or not 0 <= v <= MAX_WALK_TTL:
        _bad_out(f"ttl must be 0..{MAX_WALK_TTL}, got {v!r}")
    return v


def _msg_id_out(v: Any, what: str = "message id") -> bytes:
    if type(v) is not bytes or len(v) != MESSAGE_ID_BYTES:
        _bad_out(f"{what} must be {MESSAGE_ID_BYTES} bytes, got {v!r}")
    return v


def _gossip_out(m: Gossip) -> list[Any]:
    if type(m.channel) is not Channel:
        _bad_out(f"gossip channel must be a Channel, got {m.channel!r}")
    if type(m.payload) is not bytes or len(m.payload) > MAX_GOSSIP_PAYLOAD_BYTES:
        _bad_out(f"gossip payload must be bytes of at most {MAX_GOSSIP_PAYLOAD_BYTES}")
    return [
        Gossip.TYPE,
        _msg_id_out(m.id),
        _node_out(m.origin, "origin"),
        _uint_out(m.round, "round"),
        int(m.channel),
        m.payload,
    ]


def _control_out(m: GossipControl) -> list[Any]:
    ihave = _tuple_out(m.ihave, "ihave")
    want = _tuple_out(m.want, "want")
    if len(ihave) > MAX_IHAVE:
        _bad_out(f"more than {MAX_IHAVE} ihave entries")
    if len(want) > MAX_WANT:
        _bad_out(f"more than {MAX_WANT} wanted ids")
    if type(m.link) is not TreeLink:
        _bad_out(f"gossip-control link must be a TreeLink, got {m.link!r}")
    items = []
    for i in ihave:
        if type(i) is not IHave:
            _bad_out(f"ihave entries must be IHave, got {i!r}")
        items.append([_msg_id_out(i.id), _uint_out(i.round, "round")])
    return [GossipControl.TYPE, items, [_msg_id_out(w, "wanted id") for w in want], int(m.link)]


def _mesh_join_out(m: MeshJoin) -> list[Any]:
    return [MeshJoin.TYPE, _peer_out(m.joiner, "joiner")]


def _forward_join_out(m: ForwardJoin) -> list[Any]:
    return [ForwardJoin.TYPE, _peer_out(m.joiner, "joiner"), _ttl_out(m.ttl)]


def _neighbor_out(m: Neighbor) -> list[Any]:
    return [Neighbor.TYPE, _peer_out(m.sender, "sender"), _bool_out(m.high, "high")]


def _neighbor_reply_out(m: NeighborReply) -> list[Any]:
    return [NeighborReply.TYPE, _bool_out(m.accept, "accept")]


def _disconnect_out(m: Disconnect) -> list[Any]:
    return [Disconnect.TYPE, _bool_out(m.alive, "alive")]


def _shuffle_out(m: Shuffle) -> list[Any]:
    return [Shuffle.TYPE, _peer_out(m.origin, "origin"), _ttl_out(m.ttl), _peers_out(m.peers)]


def _shuffle_reply_out(m: ShuffleReply) -> list[Any]:
    return [ShuffleReply.TYPE, _peers_out(m.peers)]


# --- decoding ---


def _peer_in(v: Any) -> MeshPeer:
    v = _array(v, "mesh peer")
    if len(v) < 2:
        _bad("mesh peer needs 2 fields")
    return MeshPeer(_node_id(v[0]), _addr_in(v[1]))


def _peers_in(v: Any) -> tuple[MeshPeer, ...]:
    v = _array(v, "peers")
    if len(v) > MAX_SHUFFLE_PEERS:
        _bad(f"more than {MAX_SHUFFLE_PEERS} peers")
    return tuple(_peer_in(p) for p in v)


def _ttl(v: Any) -> int:
    if type(v) is not int or not 0 <= v <= MAX_WALK_TTL:
        _bad(f"ttl must be 0..{MAX_WALK_TTL}")
    return v


def _msg_id(v: Any, what: str = "message id") -> bytes:
    if type(v) is not bytes or len(v) != MESSAGE_ID_BYTES:
        _bad(f"{what} must be {MESSAGE_ID_BYTES} bytes")
    return v


def _mesh_join_in(obj: list[Any]) -> Message:
    (joiner,) = _fields(obj, 1, "mesh-join")
    return MeshJoin(_peer_in(joiner))


def _forward_join_in(obj: list[Any]) -> Message:
    joiner, ttl = _fields(obj, 2, "forward-join")
    return ForwardJoin(_peer_in(joiner), _ttl(ttl))


def _neighbor_in(obj: list[Any]) -> Message:
    sender, high = _fields(obj, 2, "neighbor")
    return Neighbor(_peer_in(sender), _bool(high, "high"))


def _neighbor_reply_in(obj: list[Any]) -> Message:
    (accept,) = _fields(obj, 1, "neighbor-reply")
    return NeighborReply(_bool(accept, "accept"))


def _disconnect_in(obj: list[Any]) -> Message:
    (alive,) = _fields(obj, 1, "disconnect")
    return Disconnect(_bool(alive, "alive"))


def _shuffle_in(obj: list[Any]) -> Message:
    origin, ttl, peers = _fields(obj, 3, "shuffle")
    return Shuffle(_peer_in(origin), _ttl(ttl), _peers_in(peers))


def _shuffle_reply_in(obj: list[Any]) -> Message:
    (peers,) = _fields(obj, 1, "shuffle-reply")
    return ShuffleReply(_peers_in(peers))


def _gossip_in(obj: list[Any]) -> Message:
    mid, origin, rnd, channel, payload = _fields(obj, 5, "gossip")
    if type(channel) is not int or channel not in _CHANNELS:
        _bad("gossip channel must be 0..2")
    if type(payload) is not bytes or len(payload) > MAX_GOSSIP_PAYLOAD_BYTES:
        _bad(f"gossip payload must be bytes of at most {MAX_GOSSIP_PAYLOAD_BYTES}")
    return Gossip(
        _msg_id(mid), _node_id(origin, "origin"), _uint(rnd, "round"), Channel(channel), payload
    )


def _gossip_control_in(obj: list[Any]) -> Message:
    ihave, want, link = _fields(obj, 3, "gossip-control")
    ihave = _array(ihave, "ihave")
    want = _array(want, "want")
    if len(ihave) > MAX_IHAVE:
        _bad(f"more than {MAX_IHAVE} ihave entries")
    if len(want) > MAX_WANT:
        _bad(f"more than {MAX_WANT} wanted ids")
    if type(link) is not int or link not in _TREE_LINKS:
        _bad("gossip-control link must be 0..2")
    items = []
    for i in ihave:
        i = _array(i, "ihave entry")
        if len(i) < 2:
            _bad("ihave entry needs 2 fields")
        items.append(IHave(_msg_id(i[0]), _uint(i[1], "round")))
    return GossipControl(tuple(items), tuple(_msg_id(w, "wanted id") for w in want), TreeLink(link))


ENCODERS: dict[type, Callable[[Any], list[Any]]] = {
    MeshJoin: _mesh_join_out,
    ForwardJoin: _forward_join_out,
    Neighbor: _neighbor_out,
    NeighborReply: _neighbor_reply_out,
    Disconnect: _disconnect_out,
    Shuffle: _shuffle_out,
    ShuffleReply: _shuffle_reply_out,
    Gossip: _gossip_out,
    GossipControl: _control_out,
}
DECODERS: dict[int, Callable[[list[Any]], Message]] = {
    MeshJoin.TYPE: _mesh_join_in,
    ForwardJoin.TYPE: _forward_join_in,
    Neighbor.TYPE: _neighbor_in,
    NeighborReply.TYPE: _neighbor_reply_in,
    Disconnect.TYPE: _disconnect_in,
    Shuffle.TYPE: _shuffle_in,
    ShuffleReply.TYPE: _shuffle_reply_in,
    Gossip.TYPE: _gossip_in,
    GossipControl.TYPE: _gossip_control_in,
}
