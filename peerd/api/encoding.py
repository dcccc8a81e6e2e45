"""The local API's results and events: core data as API maps.

Converters from core values (:class:`MemberInfo`, :class:`MemberEvent`,
registry entries and events, user events, messages to names) to the maps the
spec gives for results and watch events. They are pure, and the only place
where a core type meets the API's field names, so a change of either side
shows up here and in the spec vectors, not across the daemon. The payload of
a user event on the mesh (name and bytes) is encoded here too, since both
ends of it are API operations.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

import cbor2

from peerd import __version__
from peerd.api.args import DEFAULT_SCOPE, MAX_EVENT_BYTES
from peerd.api.framing import _DECODER_OPTIONS, Topic, format_addr
from peerd.core.events import MemberEvent, MemberInfo, RegEventKind, RegistryEvent
from peerd.core.registry.service import entry_to_dict
from peerd.wire.messages import NodeId, RegEntry, RegKind, Status


def member_to_wire(m: MemberInfo) -> dict[str, Any]:
    """One entry of the ``members`` result and the ``data`` of member events."""
    return {
        "name": m.name,
        "id": m.node.hex(),
        "addr": format_addr(m.addr),
        "status": m.status.label,
        "incarnation": m.incarnation,
        "generation": m.generation,
        "tags": dict(m.tags),
    }


def member_event_to_wire(ev: MemberEvent) -> tuple[str, dict[str, Any]]:
    """``(event name, data)`` for a member event on a ``members`` watch."""
    data = member_to_wire(ev.member)
    if ev.other is not None:
        data["other"] = member_to_wire(ev.other)
    return ev.kind.value, data


def status_to_wire(
    local: MemberInfo, health: int, members: Iterable[MemberInfo], version: str = __version__
) -> dict[str, Any]:
    """The ``status`` result. ``members`` is every known member (counts by status)."""
    counts = {s.label: 0 for s in Status}
    for m in members:
        counts[m.status.label] += 1
    return {
        "name": local.name,
        "id": local.node.hex(),
        "addr": format_addr(local.addr),
        "incarnation": local.incarnation,
        "generation": local.generation,
        "health": health,
        "members": counts,
        "version": version,
    }


SNAPSHOT_MEMBER = "member"
"""Watch event (topic ``members``, with ``snapshot``): one member as it is at the cut."""
SNAPSHOT_ENTRY = "entry"
"""Watch event (topic ``registry``, with ``snapshot``): one entry as it is at the cut."""
SNAPSHOT_END = "snapshot_end"
"""Watch event closing the snapshot of one topic: ``{"topic", "count"}``.
Every event of that topic after it is a change made after the cut."""


def with_topic(item: tuple[str, dict[str, Any]], topic: str) -> tuple[str, dict[str, Any]]:
    """A change event as a watch stream carries it: its data names its
    ``topic`` (a copy; the original may be sent elsewhere too)."""
    return item[0], {**item[1], "topic": topic}


def snapshot_member_to_wire(m: MemberInfo) -> tuple[str, dict[str, Any]]:
    """One member of a ``members`` snapshot."""
    data = member_to_wire(m)
    data["topic"], data["snapshot"] = Topic.MEMBERS.value, True
    return SNAPSHOT_MEMBER, data


def snapshot_entry_to_wire(
    origin: NodeId, entry: RegEntry, member: MemberInfo | None = None
) -> tuple[str, dict[str, Any]]:
    """One entry of a ``registry`` snapshot."""
    data = reg_entry_to_wire(origin, entry, member)
    data["topic"], data["snapshot"] = Topic.REGISTRY.value, True
    return SNAPSHOT_ENTRY, data


def snapshot_end_to_wire(topic: str, count: int) -> tuple[str, dict[str, Any]]:
    return SNAPSHOT_END, {"topic": topic, "count": count}


def reg_entry_to_wire(
    origin: NodeId, entry: RegEntry, member: MemberInfo | None = None
) -> dict[str, Any]:
    """One registry entry as the API shows it: what the core reports
    (:func:`peerd.core.registry.service.entry_to_dict`) plus the owner node's
    name and address from membership, when it is known."""
    out = entry_to_dict(origin, entry)
    if member is not None:
        out["node_name"] = member.name
        out["node_addr"] = format_addr(member.addr)
    return out


def entry_wire_size(entry: RegEntry) -> int:
    """A cheap upper estimate of the encoded size of one entry map."""
    return (
        160 + len(entry.scope) + len(entry.name) + sum(len(k) + len(v) + 4 for k, v in entry.meta)
    ) * 2


def registry_event_to_wire(ev: RegistryEvent, member_of: Any = None) -> tuple[str, dict[str, Any]]:
    """``(event name, data)`` for a registry event: the entry; for
    ``conflict`` (the entry lost its name) also ``"winner"``, the entry that
    holds the name. ``member_of(node_id)`` adds node names and addresses."""

    def member(node: NodeId) -> MemberInfo | None:
        return member_of(node) if member_of is not None else None

    data = reg_entry_to_wire(ev.origin, ev.entry, member(ev.origin))
    if ev.kind is RegEventKind.CONFLICT and ev.winner is not None:
        w_origin, w_entry = ev.winner
        data["winner"] = reg_entry_to_wire(w_origin, w_entry, member(w_origin))
    return ev.kind.value, data


def user_event_to_wire(
    msg_id: bytes, origin: NodeId, name: str, payload: bytes, origin_name: str | None = None
) -> dict[str, Any]:
    """The ``data`` of a ``user`` event on an ``events`` watch."""
    data: dict[str, Any] = {
        "name": name,
        "payload": payload,
        "id": msg_id.hex(),
        "origin": origin.hex(),
    }
    if origin_name is not None:
        data["origin_name"] = origin_name
    return data


def encode_user_event(name: str, payload: bytes) -> bytes:
    """The broadcast payload of a user event: CBOR ``[name, payload]``."""
    return cbor2.dumps([name, payload])


def decode_user_event(data: bytes) -> tuple[str, bytes] | None:
    """Inverse of :func:`encode_user_event`; None for anything malformed."""
    if len(data) > MAX_EVENT_BYTES + 64:
        return None
    fp = io.BytesIO(data)
    try:
        obj = cbor2.CBORDecoder(fp, **_DECODER_OPTIONS).decode()
    except Exception:  # garbage makes cbor2 raise many types (see decode_body)
        return None
    if fp.tell() != len(data):
        return None
    if (
        type(obj) is not list
        or len(obj) != 2
        or type(obj[0]) is not str
        or type(obj[1]) is not bytes
        or not obj[0]
    ):
        return None
    return obj[0], obj[1]


MESSAGE_EVENT = "message"
"""Connection event (stream 0) carrying a message to a name this connection holds."""


def message_event_to_wire(
    sender: str | None,
    from_node: NodeId,
    kind: RegKind | None,
    scope: str,
    name: str,
    payload: bytes,
    *,
    from_scope: str = "",
    reply_to: str | None = None,
) -> dict[str, Any]:
    """The ``data`` of a ``message`` connection event: a message to ``name``
    (or group; ``kind`` None: a reply to this connection, ``scope`` and
    ``name`` "") from the process holding ``sender`` in ``from_scope`` (None:
    it holds no name) on node ``from_node``. ``reply_to``: the token that
    answers the sending connection itself (None: the sender's daemon is too
    old to say which)."""
    return {
        "from": sender or None,
        "from_scope": (from_scope or DEFAULT_SCOPE) if sender else None,
        "from_node": from_node.hex(),
        "kind": "reply" if kind is None else "name" if kind is RegKind.NAME else "group",
        "scope": scope,
        "name": name,
        "payload": payload,
        "reply_to": reply_to,
    }
