"""Protocol messages: the only vocabulary peers speak.

Every message is a frozen dataclass with a ``TYPE`` number. Type numbers are
part of the protocol and append-only: never renumber or reuse one (see
proto/wire.cddl). On the wire a message is a CBOR array ``[type, field...]``
in the field order given here; a datagram is a CBOR array of such messages
(see :mod:`peerd.wire.codec`). Byte-exact examples: proto/vectors/messages.json.

Node ids are 16 random bytes. An address is ``(ip_literal, port)`` where the ip
literal is an IPv4 or IPv6 address in text form; on the wire it is the packed
4 or 16 bytes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

Addr = tuple[str, int]
NodeId = bytes
Tags = tuple[tuple[str, str], ...]  # sorted (key, value) pairs: hashable and canonical

NODE_ID_BYTES = 16


class Status(enum.IntEnum):
    """Membership status of a node, as gossiped and as shown by `peerd members`."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Ping:
    """Direct probe. ``target`` guards against a ping reaching a different node
    that now holds the target's old address."""

    TYPE: ClassVar[int] = 1
    seq: int
    target: NodeId


@dataclass(frozen=True, slots=True)
class PingReq:
    """Ask a helper to probe ``target`` at ``target_addr`` on our behalf
    (SWIM indirect probe). With ``nack`` the helper answers with a Nack if it
    got no ack in time (Lifeguard: tells us the helper itself is alive)."""

    TYPE: ClassVar[int] = 2
    seq: int
    target: NodeId
    target_addr: Addr
    nack: bool


@dataclass(frozen=True, slots=True)
class Ack:
    """Answer to a Ping, or relayed by a PingReq helper; ``seq`` is the probe's."""

    TYPE: ClassVar[int] = 3
    seq: int


@dataclass(frozen=True, slots=True)
class Nack:
    """A PingReq helper got no ack from the target in time (Lifeguard); proves
    the helper itself is alive, so our own slowness is not blamed on it."""

    TYPE: ClassVar[int] = 4
    seq: int


@dataclass(frozen=True, slots=True)
class Alive:
    """A node is alive at this incarnation, with this address and tags."""

    TYPE: ClassVar[int] = 5
    node: NodeId
    name: str
    addr: Addr
    incarnation: int
    generation: int
    tags: Tags


@dataclass(frozen=True, slots=True)
class Suspect:
    """``sender`` suspects ``node`` at ``incarnation``."""

    TYPE: ClassVar[int] = 6
    node: NodeId
    incarnation: int
    sender: NodeId


@dataclass(frozen=True, slots=True)
class Dead:
    """``sender`` declares ``node`` dead at ``incarnation``."""

    TYPE: ClassVar[int] = 7
    node: NodeId
    incarnation: int
    sender: NodeId


@dataclass(frozen=True, slots=True)
class Left:
    """``node`` left gracefully at ``incarnation`` (only the node itself sends it)."""

    TYPE: ClassVar[int] = 8
    node: NodeId
    incarnation: int


@dataclass(frozen=True, slots=True)
class Died:
    """``node`` is dead at ``incarnation``: :class:`Dead` without the sender,
    which nobody acts on. The form in which a death is gossiped: every node
    hears of every death several times, so its 20 bytes (Dead's 37) are
    most of what a burst of failures costs the cluster."""

    TYPE: ClassVar[int] = 13
    node: NodeId
    incarnation: int


NODE_PREFIX_BYTES = 8


@dataclass(frozen=True, slots=True)
class DiedRef:
    """:class:`Died` naming the node by the first ``NODE_PREFIX_BYTES`` of
    its id: 12 bytes instead of 20, for the many copies a burst of failures
    makes every node hear. A sender uses it only when no other member it knows
    shares the prefix; a receiver acts on it only when exactly one member it
    knows has that prefix (otherwise it drops it, counted: the death still
    arrives by probing, suspicion or anti-entropy)."""

    TYPE: ClassVar[int] = 14
    prefix: bytes
    incarnation: int


@dataclass(frozen=True, slots=True)
class MemberState:
    """One row of a push-pull state exchange (not a message on its own)."""

    node: NodeId
    name: str
    addr: Addr
    incarnation: int
    generation: int
    tags: Tags
    status: Status


@dataclass(frozen=True, slots=True)
class PushPull:
    """Full state exchange over a stream (anti-entropy). ``join`` marks the
    first exchange of a joining node."""

    TYPE: ClassVar[int] = 9
    join: bool
    members: tuple[MemberState, ...]


@dataclass(frozen=True, slots=True)
class SyncDigest:
    """Digest anti-entropy, first step (over a stream): the membership split
    into ``2**bits`` buckets by the first bits of the node id, and for each
    the XOR of a 32-bit hash of (node, incarnation, status) of its members,
    as ``4 * 2**bits`` big-endian bytes. The peer answers with a
    :class:`SyncRows` naming the buckets that differ (and no rows)."""

    TYPE: ClassVar[int] = 11
    bits: int
    hashes: bytes


@dataclass(frozen=True, slots=True)
class SyncRows:
    """Digest anti-entropy, second step: the members of the listed buckets.
    As a request it carries the opener's rows; the peer merges them, then
    answers with its own rows of the same buckets (so a refutation it had to
    make is in the answer, as with push-pull)."""

    TYPE: ClassVar[int] = 12
    bits: int
    buckets: tuple[int, ...]
    members: tuple[MemberState, ...]


# --- registry (types 20-29) ---------------------------------------------------
# See peerd/core/registry/state.py for the model: every entry belongs to one
# origin (node id, generation), whose partition has a version counter.


class RegKind(enum.IntEnum):
    NAME = 0  # unique within its scope
    GROUP = 1  # many members per group


@dataclass(frozen=True, slots=True)
class RegEntry:
    """One registration (not a message on its own)."""

    eid: int  # origin-local id, never reused within a generation
    kind: RegKind
    scope: str
    name: str
    claimed_ms: int  # the registering daemon's wall clock: the conflict rule
    pid: int  # the owning process, as its daemon saw it (SO_PEERCRED)
    uid: int
    meta: Tags


@dataclass(frozen=True, slots=True)
class RegChange:
    """Entry ``eid`` set to ``entry`` (None: removed) at ``version``."""

    version: int
    eid: int
    entry: RegEntry | None


@dataclass(frozen=True, slots=True)
class RegDelta:
    """Changes of ``origin``'s partition after version ``base`` up to ``top``.
    ``ack``: the origin waits for acknowledgements (register wait=settled)."""

    TYPE: ClassVar[int] = 20
    origin: NodeId
    generation: int
    base: int
    top: int
    changes: tuple[RegChange, ...]
    ack: bool = False


@dataclass(frozen=True, slots=True)
class RegSnapshot:
    """``origin``'s whole partition at ``version``."""

    TYPE: ClassVar[int] = 21
    origin: NodeId
    generation: int
    version: int
    entries: tuple[RegEntry, ...]


@dataclass(frozen=True, slots=True)
class RegDigestRow:
    origin: NodeId
    generation: int
    version: int


@dataclass(frozen=True, slots=True)
class RegSync:
    """Registry anti-entropy over a stream: our digest, and the deltas or
    snapshots we believe the peer lacks.

    Large registries compare bucket hashes first: with ``hashes`` (and
    ``bits``), the message only asks "which of these 2**bits buckets of
    origins differ?"; with ``bits`` and ``buckets``, ``digest`` covers only
    those buckets (origins outside them are not missing). ``bits`` -1: a
    whole digest."""

    TYPE: ClassVar[int] = 22
    digest: tuple[RegDigestRow, ...]
    items: tuple[RegDelta | RegSnapshot, ...]
    bits: int = -1
    buckets: tuple[int, ...] = ()
    hashes: bytes = b""


@dataclass(frozen=True, slots=True)
class RegAck:
    """The sender holds ``origin``'s partition at ``version`` or later."""

    TYPE: ClassVar[int] = 23
    origin: NodeId
    generation: int
    version: int


# --- partial mesh (types 30-39) ------------------------------------------------
# HyParView membership overlay (Leitao, Pereira, Rodrigues 2007) and Plumtree
# broadcast trees (same authors, 2007) over its links: see peerd/core/mesh/.
# These travel over persistent links (streams), not datagrams; the sender is
# the link's authenticated peer, so no message repeats it except where its
# address is needed.

MESSAGE_ID_BYTES = 16


@dataclass(frozen=True, slots=True)
class MeshPeer:
    """A node of the overlay and the address to open a link to (not a message)."""

    node: NodeId
    addr: Addr


@dataclass(frozen=True, slots=True)
class MeshJoin:
    """Sent by a joining node to its contact, which takes it as a neighbour
    (answering with a NeighborReply) and starts random walks of ForwardJoin."""

    TYPE: ClassVar[int] = 30
    joiner: MeshPeer


@dataclass(frozen=True, slots=True)
class ForwardJoin:
    """A random walk announcing ``joiner``; ``ttl`` hops are left."""

    TYPE: ClassVar[int] = 31
    joiner: MeshPeer
    ttl: int


@dataclass(frozen=True, slots=True)
class Neighbor:
    """Ask the receiver to take ``sender`` into its active view. ``high``: the
    sender has no neighbour at all (or ends a join walk), so the receiver
    accepts even when full (it drops a neighbour to make room)."""

    TYPE: ClassVar[int] = 32
    sender: MeshPeer
    high: bool


@dataclass(frozen=True, slots=True)
class NeighborReply:
    """Answer to a Neighbor or MeshJoin: accepted (now neighbours) or not."""

    TYPE: ClassVar[int] = 33
    accept: bool


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The sender dropped the receiver from its active view. ``alive``: it
    stays around (keep it as a passive peer); false: it is leaving."""

    TYPE: ClassVar[int] = 34
    alive: bool


@dataclass(frozen=True, slots=True)
class Shuffle:
    """A random walk carrying a sample of ``origin``'s views; the node where it
    ends answers ``origin`` with a ShuffleReply and keeps the sample."""

    TYPE: ClassVar[int] = 35
    origin: MeshPeer
    ttl: int
    peers: tuple[MeshPeer, ...]


@dataclass(frozen=True, slots=True)
class ShuffleReply:
    """A sample of the replier's passive view, for the shuffle's origin."""

    TYPE: ClassVar[int] = 36
    peers: tuple[MeshPeer, ...]


class Channel(enum.IntEnum):
    """What a broadcast carries. Lower values are sent first on a busy link and
    have their own size limits, so user payloads cannot starve the daemon's."""

    MEMBERSHIP = 0
    REGISTRY = 1
    USER = 2


@dataclass(frozen=True, slots=True)
class Gossip:
    """Plumtree eager push of one broadcast. ``round`` counts hops from the
    origin (1 at the origin's neighbours)."""

    TYPE: ClassVar[int] = 37
    id: bytes  # MESSAGE_ID_BYTES, unique per broadcast
    origin: NodeId
    round: int
    channel: Channel
    payload: bytes


@dataclass(frozen=True, slots=True)
class IHave:
    """An announcement: the sender has broadcast ``id``, which would reach the
    receiver at hop ``round`` (not a message on its own)."""

    id: bytes
    round: int


class TreeLink(enum.IntEnum):
    """What a GossipControl asks of the receiver's link to the sender."""

    KEEP = 0
    EAGER = 1  # GRAFT: push payloads to me from now on
    LAZY = 2  # PRUNE: only announce them


@dataclass(frozen=True, slots=True)
class GossipControl:
    """Plumtree's lazy side, batched: IHAVE announcements, GRAFT (``want`` the
    payloads of these ids, with ``link`` = EAGER) and PRUNE (``link`` = LAZY)."""

    TYPE: ClassVar[int] = 38
    ihave: tuple[IHave, ...]
    want: tuple[bytes, ...]
    link: TreeLink


# --- messages to names (types 39-40) -------------------------------------------
# Over a direct peer link (see peerd/shell/links.py) from the sender's daemon
# to the daemon of the entry's owner, which answers every NameMsg with one
# NameReply of the same seq: at most once, in order per link.


class NameStatus(enum.IntEnum):
    """Outcome of one NameMsg at the owner's daemon."""

    DELIVERED = 0  # queued on the owning API connection
    NOT_FOUND = 1  # the entry is not held here (any more): the owner vanished
    MAILBOX_FULL = 2  # the owning connection is not reading: its queue is full
    REFUSED = 3  # the daemon cannot take it (leaving, or it has no registry)
    # The entry is held by a process that takes no messages (registered with
    # messages=false, e.g. by ``peerd exec``). Only sent to a sender that
    # showed it knows this value (its NameMsg had the reply fields); an
    # older sender gets REFUSED instead.
    NO_RECEIVER = 4


@dataclass(frozen=True, slots=True)
class NameMsg:
    """A message for the entry ``eid`` (of ``kind`` ``scope``/``name``) owned
    by the receiving daemon. ``sender``: the sending process's registered
    name ("" if it has none), so the receiver can answer it.

    Trailing fields (appended in wire version 1, all or none; 0 / "" when
    absent): where the message came from, so that an answer needs no
    registry: ``from_gen`` the sending daemon's generation, ``from_conn``
    the sending API connection there (a reply goes back to exactly that
    connection of that life); ``from_scope`` / ``from_eid`` the scope and
    entry id of ``sender`` on the sending daemon (a hint that lets the
    receiver route a send to ``sender`` before its replica holds the entry).
    ``to_gen``: the receiving daemon's generation the sender meant (0: any);
    ``to_conn`` non-zero: the message is a reply for that API connection,
    not for an entry (then ``scope``/``name`` are "" and ``eid`` 0, which
    an older receiver answers NOT_FOUND)."""

    TYPE: ClassVar[int] = 39
    seq: int
    kind: RegKind
    scope: str
    name: str
    eid: int
    sender: str
    payload: bytes
    from_gen: int = 0
    from_conn: int = 0
    from_scope: str = ""
    from_eid: int = 0
    to_gen: int = 0
    to_conn: int = 0

    @property
    def extended(self) -> bool:
        """The message carries the trailing fields (its sender knows them)."""
        return bool(self.from_gen or self.from_conn or self.from_eid or self.to_gen or self.to_conn)


@dataclass(frozen=True, slots=True)
class NameReply:
    """The answer to the NameMsg ``seq`` sent over the same link."""

    TYPE: ClassVar[int] = 40
    seq: int
    status: NameStatus


# --- keyring operations across the cluster (types 15-16) ----------------------
# ``peerd keys ... --cluster``: one KeyRequest per stream (the push-pull
# transport: one sealed request frame, one sealed reply frame), answered by
# one KeyReply. Keys travel only sealed (a plaintext node refuses install).


class KeyOp(enum.IntEnum):
    QUERY = 0  # change nothing; answer with the keyring
    INSTALL = 1  # key: the 32-byte key
    USE = 2  # key: the 4-byte key id of an installed key
    REMOVE = 3  # key: the 4-byte key id


class KeyStatus(enum.IntEnum):
    """Outcome of one KeyRequest at the receiving daemon."""

    OK = 0  # done (or nothing to do: already so)
    NOT_INSTALLED = 1  # use of a key this node does not have
    PRIMARY = 2  # remove of this node's primary key
    PLAINTEXT = 3  # install on a node without keys: refused (it would cut it off)
    FAILED = 4  # anything else (message says what)


@dataclass(frozen=True, slots=True)
class KeyRequest:
    """Ask a daemon to report or change its keyring. ``key``: empty for
    QUERY, the key (32 bytes) for INSTALL, its key id (4 bytes) otherwise."""

    TYPE: ClassVar[int] = 15
    op: KeyOp
    key: bytes


@dataclass(frozen=True, slots=True)
class KeyReply:
    """The answer to a KeyRequest: the outcome and the keyring afterwards
    (key ids; ``primary`` empty: the node runs without keys)."""

    TYPE: ClassVar[int] = 16
    status: KeyStatus
    primary: bytes
    keys: tuple[bytes, ...]
    message: str


Message = (
    Ping
    | PingReq
    | Ack
    | Nack
    | Alive
    | Suspect
    | Dead
    | Left
    | PushPull
    | SyncDigest
    | SyncRows
    | Died
    | DiedRef
    | RegDelta
    | RegSnapshot
    | RegSync
    | RegAck
    | MeshJoin
    | ForwardJoin
    | Neighbor
    | NeighborReply
    | Disconnect
    | Shuffle
    | ShuffleReply
    | Gossip
    | GossipControl
    | NameMsg
    | NameReply
    | KeyRequest
    | KeyReply
)

MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Ping,
        PingReq,
        Ack,
        Nack,
        Alive,
        Suspect,
        Dead,
        Left,
        PushPull,
        SyncDigest,
        SyncRows,
        Died,
        DiedRef,
        RegDelta,
        RegSnapshot,
        RegSync,
        RegAck,
        MeshJoin,
        ForwardJoin,
        Neighbor,
        NeighborReply,
        Disconnect,
        Shuffle,
        ShuffleReply,
        Gossip,
        GossipControl,
        NameMsg,
        NameReply,
        KeyRequest,
        KeyReply,
    )
}


def tags_from_mapping(mapping: dict[str, str]) -> Tags:
    return tuple(sorted(mapping.items()))
