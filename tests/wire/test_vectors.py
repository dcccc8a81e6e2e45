"""The normative vectors in proto/vectors/ against the implementation, both ways.

The JSON is read here with its own small reader (not generate.py's writer), so
a change in the codec or in the generator cannot silently move the vectors.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from peerd.wire import codec, seal
from peerd.wire.messages import (
    MESSAGE_TYPES,
    Ack,
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
    TreeLink,
)

VECTORS = Path(__file__).resolve().parents[2] / "proto" / "vectors"
MESSAGES = json.loads((VECTORS / "messages.json").read_text(encoding="utf-8"))
SEAL = json.loads((VECTORS / "seal.json").read_text(encoding="utf-8"))


def _addr(v: list[Any]) -> tuple[str, int]:
    ip, port = v
    # Addresses are compared as addresses: the JSON uses RFC 5952 text, and
    # Python versions differ in how they print IPv4-mapped IPv6 addresses.
    return (str(ipaddress.ip_address(ip)), port)


def _tags(v: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(v.items()))


def _member(d: dict[str, Any]) -> MemberState:
    return MemberState(
        bytes.fromhex(d["node"]),
        d["name"],
        _addr(d["addr"]),
        d["incarnation"],
        d["generation"],
        _tags(d["tags"]),
        Status[d["status"].upper()],
    )


def _reg_entry(d: dict[str, Any]) -> RegEntry:
    return RegEntry(
        d["eid"],
        RegKind[d["kind"].upper()],
        d["scope"],
        d["name"],
        d["claimed_ms"],
        d["pid"],
        d["uid"],
        _tags(d["meta"]),
    )


def _reg_change(d: dict[str, Any]) -> RegChange:
    return RegChange(d["version"], d["eid"], None if d["entry"] is None else _reg_entry(d["entry"]))


def _peer(d: dict[str, Any]) -> MeshPeer:
    return MeshPeer(bytes.fromhex(d["node"]), _addr(d["addr"]))


def message_from_json(d: dict[str, Any]) -> Message:
    h = bytes.fromhex
    match d["type"]:
        case "ping":
            return Ping(d["seq"], h(d["target"]))
        case "ping-req":
            return PingReq(d["seq"], h(d["target"]), _addr(d["target_addr"]), d["nack"])
        case "ack":
            return Ack(d["seq"])
        case "nack":
            return Nack(d["seq"])
        case "alive":
            return Alive(
                h(d["node"]),
                d["name"],
                _addr(d["addr"]),
                d["incarnation"],
                d["generation"],
                _tags(d["tags"]),
            )
        case "suspect":
            return Suspect(h(d["node"]), d["incarnation"], h(d["sender"]))
        case "dead":
            return Dead(h(d["node"]), d["incarnation"], h(d["sender"]))
        case "left":
            return Left(h(d["node"]), d["incarnation"])
        case "died":
            return Died(h(d["node"]), d["incarnation"])
        case "died-ref":
            return DiedRef(h(d["prefix"]), d["incarnation"])
        case "push-pull":
            return PushPull(d["join"], tuple(_member(m) for m in d["members"]))
        case "sync-digest":
            return SyncDigest(d["bits"], h(d["hashes"]))
        case "sync-rows":
            return SyncRows(d["bits"], tuple(d["buckets"]), tuple(_member(m) for m in d["members"]))
        case "reg-delta":
            return RegDelta(
                h(d["origin"]),
                d["generation"],
                d["base"],
                d["top"],
                tuple(_reg_change(c) for c in d["changes"]),
                d["ack"],
            )
        case "reg-snapshot":
            return RegSnapshot(
                h(d["origin"]),
                d["generation"],
                d["version"],
                tuple(_reg_entry(e) for e in d["entries"]),
            )
        case "reg-sync":
            items: list[Any] = [message_from_json(i) for i in d["items"]]
            return RegSync(
                tuple(
                    RegDigestRow(h(r["origin"]), r["generation"], r["version"]) for r in d["digest"]
                ),
                tuple(items),
                d.get("bits", -1),
                tuple(d.get("buckets", ())),
                h(d.get("hashes", "")),
            )
        case "reg-ack":
            return RegAck(h(d["origin"]), d["generation"], d["version"])
        case "mesh-join":
            return MeshJoin(_peer(d["joiner"]))
        case "forward-join":
            return ForwardJoin(_peer(d["joiner"]), d["ttl"])
        case "neighbor":
            return Neighbor(_peer(d["sender"]), d["high"])
        case "neighbor-reply":
            return NeighborReply(d["accept"])
        case "disconnect":
            return Disconnect(d["alive"])
        case "shuffle":
            return Shuffle(_peer(d["origin"]), d["ttl"], tuple(_peer(p) for p in d["peers"]))
        case "shuffle-reply":
            return ShuffleReply(tuple(_peer(p) for p in d["peers"]))
        case "gossip":
            return Gossip(
                h(d["id"]),
                h(d["origin"]),
                d["round"],
                Channel[d["channel"].upper()],
                h(d["payload"]),
            )
        case "gossip-control":
            return GossipControl(
                tuple(IHave(h(i["id"]), i["round"]) for i in d["ihave"]),
                tuple(h(w) for w in d["want"]),
                TreeLink[d["link"].upper()],
            )
        case "name-msg":
            return NameMsg(
                d["seq"],
                RegKind[d["kind"].upper()],
                d["scope"],
                d["name"],
                d["eid"],
                d["sender"],
                h(d["payload"]),
                d.get("from_gen", 0),
                d.get("from_conn", 0),
                d.get("from_scope", ""),
                d.get("from_eid", 0),
                d.get("to_gen", 0),
                d.get("to_conn", 0),
            )
        case "name-reply":
            return NameReply(d["seq"], NameStatus[d["status"].upper()])
        case "key-request":
            return KeyRequest(KeyOp[d["op"].upper()], h(d["key"]))
        case "key-reply":
            return KeyReply(
                KeyStatus[d["status"].upper().replace("-", "_")],
                h(d["primary"]),
                tuple(h(k) for k in d["keys"]),
                d["message"],
            )
    raise AssertionError(f"unknown type label {d['type']!r}")


def _name(v: dict[str, Any]) -> str:
    return str(v["name"])


# --- messages -------------------------------------------------------------------------


def test_every_message_type_has_a_vector() -> None:
    covered = {type(message_from_json(v["message"])).TYPE for v in MESSAGES["messages"]}
    assert covered == set(MESSAGE_TYPES)
    statuses = {
        m["status"]
        for v in MESSAGES["messages"]
        if v["message"]["type"] == "push-pull"
        for m in v["message"]["members"]
    }
    assert statuses == {s.label for s in Status}
    by_type: dict[str, list[dict[str, Any]]] = {}
    for v in MESSAGES["messages"]:
        by_type.setdefault(v["message"]["type"], []).append(v["message"])
    assert {g["channel"] for g in by_type["gossip"]} == {c.name.lower() for c in Channel}
    assert {c["link"] for c in by_type["gossip-control"]} == {t.name.lower() for t in TreeLink}


@pytest.mark.parametrize("vector", MESSAGES["messages"], ids=_name)
def test_message_vector(vector: dict[str, Any]) -> None:
    msg = message_from_json(vector["message"])
    data = bytes.fromhex(vector["cbor_hex"])
    assert codec.encode(msg) == data
    assert codec.decode(data) == msg
    assert codec.decode_packet(codec.pack([data])) == ([msg], [])


@pytest.mark.parametrize("vector", MESSAGES["datagrams"], ids=_name)
def test_datagram_vector(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["cbor_hex"])
    expected = [message_from_json(m) for m in vector["messages"]]
    msgs, errors = codec.decode_packet(data)
    assert msgs == expected
    assert [e.reason for e in errors] == vector["errors"]
    if not vector["errors"]:
        assert codec.pack([codec.encode(m) for m in expected]) == data


@pytest.mark.parametrize("vector", MESSAGES["invalid"], ids=_name)
def test_invalid_vector(vector: dict[str, Any]) -> None:
    with pytest.raises(codec.DecodeError) as info:
        codec.decode(bytes.fromhex(vector["cbor_hex"]))
    assert info.value.reason == vector["reason"]


# --- envelope ----------------------------------------------------------------------------


KEY = bytes.fromhex(SEAL["key_hex"])


def test_key_vector() -> None:
    assert seal.parse_key(SEAL["key"]) == KEY
    assert seal.format_key(KEY) == SEAL["key"]
    assert seal.key_id(KEY).hex() == SEAL["key_id_hex"]
    assert seal.key_id(seal.parse_key(SEAL["other_key"])).hex() == SEAL["other_key_id_hex"]
    assert SEAL["sealed_overhead"] == seal.SEALED_OVERHEAD
    assert SEAL["plaintext_overhead"] == seal.PLAIN_OVERHEAD


def _inner(v: dict[str, Any]) -> bytes:
    return (
        bytes.fromhex(v["sender_id_hex"])
        + v["epoch"].to_bytes(4, "big")
        + v["counter"].to_bytes(8, "big")
        + bytes.fromhex(v["payload_hex"])
    )


@pytest.mark.parametrize("vector", SEAL["sealed"], ids=_name)
def test_sealed_vector(vector: dict[str, Any]) -> None:
    sender = bytes.fromhex(vector["sender_id_hex"])
    nonce = bytes.fromhex(vector["nonce_hex"])
    payload = bytes.fromhex(vector["payload_hex"])
    env = bytes.fromhex(vector["envelope_hex"])
    ring = seal.Keyring([KEY])
    sealer = seal.Sealer(ring, sender, vector["epoch"], lambda n: nonce, counter=vector["counter"])
    assert sealer.seal(payload) == env
    assert seal.Opener(ring).open(env) == (sender, payload)
    # The layout, checked with the bare AEAD rather than through seal.py.
    header = bytes([0x01]) + bytes.fromhex(SEAL["key_id_hex"]) + nonce
    assert env[:17] == header
    assert ChaCha20Poly1305(KEY).decrypt(nonce, env[17:], header) == _inner(vector)


@pytest.mark.parametrize("vector", SEAL["plaintext"], ids=_name)
def test_plaintext_vector(vector: dict[str, Any]) -> None:
    sender = bytes.fromhex(vector["sender_id_hex"])
    payload = bytes.fromhex(vector["payload_hex"])
    env = bytes.fromhex(vector["envelope_hex"])
    ring = seal.Keyring()
    sealer = seal.Sealer(ring, sender, vector["epoch"], counter=vector["counter"])
    assert sealer.seal(payload) == env
    assert env == bytes([0x02, 0, 0, 0, 0]) + _inner(vector)
    assert seal.Opener(ring).open(env) == (sender, payload)


@pytest.mark.parametrize("vector", SEAL["rejected"], ids=_name)
def test_rejected_vector(vector: dict[str, Any]) -> None:
    ring = seal.Keyring([KEY] if vector["mode"] == "keyed" else [])
    with pytest.raises(seal.SealError) as info:
        seal.Opener(ring).open(bytes.fromhex(vector["envelope_hex"]))
    assert info.value.reason == vector["reason"]


def test_sealed_payload_is_the_datagram_vector() -> None:
    payload = bytes.fromhex(SEAL["sealed"][0]["payload_hex"])
    assert payload.hex() == MESSAGES["datagrams"][0]["cbor_hex"]
