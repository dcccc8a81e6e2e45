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


Message = Ping | PingReq | Ack | Nack | Alive | Suspect | Dead | Left | PushPull

MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TYPE: cls for cls in (Ping, PingReq, Ack, Nack, Alive, Suspect, Dead, Left, PushPull)
}


def tags_from_mapping(mapping: dict[str, str]) -> Tags:
    return tuple(sorted(mapping.items()))
