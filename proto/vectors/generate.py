"""Regenerate the test vectors: ``python proto/vectors/generate.py`` (``--check``:
compare with the committed files and write nothing; CI runs that).

The JSON files next to this script are the normative artefact; this script
only saves typing them by hand. Regenerating must not change them unless the
protocol changes on purpose (and then proto/wire.cddl changes too).
tests/wire/test_vectors.py checks the JSON against the implementation in
both directions with its own reading of the format.

JSON conventions: byte strings are lowercase hex; integers are exact (parse
them as big integers where the language needs it); an address is
``[ip text, port]``; tags are a JSON object; a member status is its label.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

KIND = {
    1: "ping",
    2: "ping-req",
    3: "ack",
    4: "nack",
    5: "alive",
    6: "suspect",
    7: "dead",
    8: "left",
    9: "push-pull",
    11: "sync-digest",
    12: "sync-rows",
    13: "died",
    14: "died-ref",
    20: "reg-delta",
    21: "reg-snapshot",
    22: "reg-sync",
    23: "reg-ack",
    30: "mesh-join",
    31: "forward-join",
    32: "neighbor",
    33: "neighbor-reply",
    34: "disconnect",
    35: "shuffle",
    36: "shuffle-reply",
    37: "gossip",
    38: "gossip-control",
    39: "name-msg",
    40: "name-reply",
    15: "key-request",
    16: "key-reply",
}


def describe(value: Any) -> Any:
    """A JSON description of a message (or of one of its field values)."""
    from dataclasses import fields, is_dataclass

    from peerd.wire.messages import (
        Channel,
        KeyOp,
        KeyStatus,
        NameStatus,
        RegKind,
        Status,
        TreeLink,
    )

    if isinstance(value, RegKind | Channel | TreeLink | NameStatus | KeyOp | KeyStatus):
        return value.name.lower()
    if is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        type_no = getattr(type(value), "TYPE", None)
        if type_no is not None:
            out["type"] = KIND[type_no]
        for f in fields(value):
            v = getattr(value, f.name)
            if f.name in ("tags", "meta"):
                out[f.name] = dict(v)
            elif f.name in ("addr", "target_addr"):
                out[f.name] = [v[0], v[1]]
            else:
                out[f.name] = describe(v)
        return out
    if isinstance(value, Status):
        return value.label
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple):
        return [describe(v) for v in value]
    return value


def message_vectors() -> dict[str, Any]:
    from peerd.wire import codec
    from peerd.wire.messages import (
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
        tags_from_mapping,
    )

    a = bytes.fromhex("a1a2a3a4a5a6a7a8a9aaabacadaeafb0")
    b = bytes.fromhex("b1b2b3b4b5b6b7b8b9babbbcbdbebfc0")
    c = bytes.fromhex("00112233445566778899aabbccddeeff")
    u64_max = 2**64 - 1
    tags = tags_from_mapping({"zone": "eu-west-1b", "dc": "par1", "b": "", "role": "web"})

    named: list[tuple[str, Message]] = [
        ("ping", Ping(1, a)),
        ("ping-max-seq", Ping(u64_max, a)),
        ("ping-req-ipv4", PingReq(42, b, ("192.0.2.7", 7946), False)),
        ("ping-req-ipv6-nack", PingReq(43, b, ("2001:db8::1", 7946), True)),
        ("ack-23", Ack(23)),
        ("ack-24", Ack(24)),
        ("ack-256", Ack(256)),
        ("ack-2^32", Ack(2**32)),
        ("nack", Nack(65535)),
        ("alive", Alive(a, "web-1", ("192.0.2.1", 7946), 3, 17, tags)),
        ("alive-empty", Alive(c, "", ("::", 0), 0, 0, ())),
        (
            "alive-unicode-ipv4-mapped",
            Alive(b, "nœud-é", ("::ffff:192.0.2.9", 65535), u64_max, 1, (("ключ", "значение"),)),
        ),
        ("suspect", Suspect(b, 4, a)),
        ("dead", Dead(b, 5, c)),
        ("died", Died(b, 5)),
        ("died-ref", DiedRef(b[:8], 5)),
        ("left", Left(a, 6)),
        ("push-pull-empty", PushPull(False, ())),
        (
            "push-pull-join",
            PushPull(
                True,
                (
                    MemberState(
                        a, "web-1", ("192.0.2.1", 7946), 3, 17, (("dc", "par1"),), Status.ALIVE
                    ),
                    MemberState(b, "web-2", ("2001:db8::2", 7946), 9, 2, (), Status.SUSPECT),
                    MemberState(c, "db-1", ("192.0.2.3", 7946), 1, 1, (), Status.DEAD),
                    MemberState(a[::-1], "db-2", ("192.0.2.4", 7947), 0, 4, (), Status.LEFT),
                ),
            ),
        ),
        ("sync-digest", SyncDigest(2, bytes.fromhex("00000000deadbeef0badf00d00000001"))),
        ("sync-rows-buckets", SyncRows(2, (1, 2), ())),
        (
            "sync-rows-members",
            SyncRows(
                2, (1,), (MemberState(b, "web-2", ("2001:db8::2", 7946), 9, 2, (), Status.SUSPECT),)
            ),
        ),
    ]
    svc = RegEntry(
        1, RegKind.NAME, "default", "db-primary", 1763769600000, 4242, 1000, (("role", "primary"),)
    )
    grp = RegEntry(2, RegKind.GROUP, "jobs", "workers", 1763769600123, 4243, 1000, ())
    delta = RegDelta(a, 3, 4, 6, (RegChange(5, 1, svc), RegChange(6, 2, None)), True)
    snap = RegSnapshot(b, 1, 9, (svc, grp))
    named += [
        ("reg-delta", delta),
        ("reg-snapshot", snap),
        ("reg-sync", RegSync((RegDigestRow(a, 3, 6), RegDigestRow(b, 1, 9)), (delta, snap))),
        ("reg-sync-empty", RegSync((), ())),
        # a large registry's first message: bucket hashes (2 bits: 4 buckets)
        ("reg-sync-hashes", RegSync((), (), 2, (), bytes(range(16)))),
        # the reply: the rows of the buckets that differ (here buckets 0 and 2)
        ("reg-sync-buckets", RegSync((RegDigestRow(a, 3, 6),), (), 2, (0, 2), b"")),
        ("reg-ack", RegAck(a, 3, 6)),
    ]
    pa = MeshPeer(a, ("192.0.2.1", 7946))
    pb = MeshPeer(b, ("2001:db8::2", 7946))
    pc = MeshPeer(c, ("192.0.2.3", 7947))
    m1 = bytes.fromhex("0123456789abcdef0000000000000001")
    m2 = bytes.fromhex("0123456789abcdef0000000000000002")
    named += [
        ("mesh-join", MeshJoin(pa)),
        ("forward-join", ForwardJoin(pb, 6)),
        ("neighbor-high", Neighbor(pa, True)),
        ("neighbor-low", Neighbor(pb, False)),
        ("neighbor-reply-accept", NeighborReply(True)),
        ("neighbor-reply-reject", NeighborReply(False)),
        ("disconnect-alive", Disconnect(True)),
        ("disconnect-leaving", Disconnect(False)),
        ("shuffle", Shuffle(pa, 5, (pa, pb, pc))),
        ("shuffle-reply", ShuffleReply((pc, pb))),
        ("shuffle-reply-empty", ShuffleReply(())),
        ("gossip-membership", Gossip(m1, a, 1, Channel.MEMBERSHIP, bytes.fromhex("8103"))),
        (
            # a batch of membership news over the tree: the payload is a
            # datagram's (peerd.core.swim.treecast)
            "gossip-membership-batch",
            Gossip(
                m2,
                a,
                2,
                Channel.MEMBERSHIP,
                codec.pack(
                    [
                        codec.encode(Alive(a, "web-1", ("192.0.2.1", 7946), 3, 17, ())),
                        codec.encode(Died(b, 5)),
                        codec.encode(Left(c, 9)),
                    ]
                ),
            ),
        ),
        ("gossip-registry", Gossip(m2, b, 7, Channel.REGISTRY, b"")),
        ("gossip-user", Gossip(m2, c, 300, Channel.USER, b"hello, mesh")),
        ("gossip-control-ihave", GossipControl((IHave(m1, 2), IHave(m2, 3)), (), TreeLink.KEEP)),
        ("gossip-control-graft", GossipControl((), (m1,), TreeLink.EAGER)),
        ("gossip-control-prune", GossipControl((), (), TreeLink.LAZY)),
        ("name-msg", NameMsg(7, RegKind.NAME, "default", "db-primary", 12, "web-1", b"ping")),
        ("name-msg-group", NameMsg(2**40, RegKind.GROUP, "jobs", "workers", 3, "", b"")),
        ("name-reply-delivered", NameReply(7, NameStatus.DELIVERED)),
        ("name-reply-not-found", NameReply(8, NameStatus.NOT_FOUND)),
        ("name-reply-mailbox-full", NameReply(9, NameStatus.MAILBOX_FULL)),
        ("name-reply-refused", NameReply(10, NameStatus.REFUSED)),
        ("key-request-query", KeyRequest(KeyOp.QUERY, b"")),
        ("key-request-install", KeyRequest(KeyOp.INSTALL, bytes(range(32)))),
        ("key-request-use", KeyRequest(KeyOp.USE, bytes.fromhex("1a2b3c4d"))),
        ("key-request-remove", KeyRequest(KeyOp.REMOVE, bytes.fromhex("0badf00d"))),
        (
            "key-reply-ok",
            KeyReply(
                KeyStatus.OK,
                bytes.fromhex("1a2b3c4d"),
                (bytes.fromhex("1a2b3c4d"), bytes.fromhex("0badf00d")),
                "",
            ),
        ),
        (
            "key-reply-not-installed",
            KeyReply(
                KeyStatus.NOT_INSTALLED,
                bytes.fromhex("0badf00d"),
                (bytes.fromhex("0badf00d"),),
                "no installed key has an id starting with '1a2b3c4d'",
            ),
        ),
        ("key-reply-plaintext", KeyReply(KeyStatus.PLAINTEXT, b"", (), "no keys")),
        ("name-reply-no-receiver", NameReply(11, NameStatus.NO_RECEIVER)),
        (
            "name-msg-with-origin",
            NameMsg(
                12, RegKind.NAME, "default", "db", 4, "caller-7", b"ping", 3, 41, "default", 9, 2, 0
            ),
        ),
        (
            "name-msg-reply",
            NameMsg(13, RegKind.NAME, "", "", 0, "db", b"pong", 2, 17, "default", 4, 3, 41),
        ),
    ]
    messages = [
        {"name": name, "message": describe(m), "cbor_hex": codec.encode(m).hex()}
        for name, m in named
    ]

    packet: list[Message] = [
        Ping(7, a),
        Alive(a, "web-1", ("192.0.2.1", 7946), 3, 17, ()),
        Suspect(b, 4, a),
    ]
    # A newer peer's datagram: one message with an appended field, one unknown type.
    newer = codec.pack(
        [
            bytes.fromhex("8303") + bytes.fromhex("0a") + bytes.fromhex("63") + b"new",
            bytes.fromhex("820a00"),
            codec.encode(Left(a, 6)),
        ]
    )
    datagrams: list[dict[str, Any]] = [
        {
            "name": "three-messages",
            "messages": [describe(m) for m in packet],
            "errors": [],
            "cbor_hex": codec.pack([codec.encode(m) for m in packet]).hex(),
        },
        {"name": "empty", "messages": [], "errors": [], "cbor_hex": codec.pack([]).hex()},
        {
            "name": "from-a-newer-peer",
            "messages": [describe(Ack(10)), describe(Left(a, 6))],
            "errors": ["unknown_type"],
            "cbor_hex": newer.hex(),
        },
    ]
    for d in datagrams:  # the generator checks itself before writing anything
        msgs, errs = codec.decode_packet(bytes.fromhex(d["cbor_hex"]))
        assert [describe(m) for m in msgs] == d["messages"], d["name"]
        assert [e.reason for e in errs] == d["errors"], d["name"]

    ping = codec.encode(Ping(1, a)).hex()
    invalid = [
        ("empty-input", "", "bad_cbor"),
        ("trailing-bytes", ping + "00", "bad_cbor"),
        ("truncated", ping[:-2], "bad_cbor"),
        ("cbor-tag", "c1" + ping, "bad_cbor"),
        ("indefinite-array", "9f0301ff", "bad_cbor"),
        (
            "duplicate-tag-key",
            "87 05 50" + a.hex() + "60 82 44c0000201 00 00 00 a2 6161 60 6161 60",
            "bad_cbor",
        ),
        ("not-an-array", "a0", "not_message"),
        ("empty-array", "80", "not_message"),
        ("text-type", "8263616b6301", "not_message"),
        ("unknown-type", "820a00", "unknown_type"),
        ("missing-field", "8101", "bad_arity"),
        ("negative-seq", "820320", "bad_field"),
        ("seq-too-big-bignum", "8203c249010000000000000000", "bad_cbor"),
        ("seq-is-bool", "8203f5", "bad_field"),
        ("short-node-id", "8301014f" + a.hex()[:30], "bad_field"),
        ("ip-5-bytes", "85 02 01 50" + a.hex() + "82 45 c000020100 01 f4", "bad_field"),
        (
            "bad-status",
            "83 09 f4 81 87 50" + a.hex() + "60 82 44c0000201 00 00 00 a0 04",
            "bad_field",
        ),
        (
            "name-256-bytes",
            "87 05 50" + a.hex() + "79 0100" + "61" * 256 + "82 44c0000201 00 00 00 a0",
            "bad_field",
        ),
        (
            "forward-join-ttl-256",
            "83 181f 82 50" + a.hex() + "82 44c0000201 00 190100",
            "bad_field",
        ),
        (
            "gossip-unknown-channel",
            "86 1825 50" + m1.hex() + "50" + a.hex() + "01 03 40",
            "bad_field",
        ),
        (
            "gossip-short-id",
            "86 1825 4f" + m1.hex()[:30] + "50" + a.hex() + "01 00 40",
            "bad_field",
        ),
        ("gossip-control-unknown-link", "84 1826 80 80 03", "bad_field"),
        ("name-reply-unknown-status", "83 1828 0b 05", "bad_field"),
        ("mesh-join-missing-peer", "81 181e", "bad_arity"),
    ]
    invalid_out = []
    for name, hexdata, reason in invalid:
        data = bytes.fromhex(hexdata.replace(" ", ""))
        try:
            codec.decode(data)
        except codec.DecodeError as err:
            assert err.reason == reason, (name, err)
        else:
            raise AssertionError(f"{name} decoded")
        invalid_out.append({"name": name, "cbor_hex": data.hex(), "reason": reason})

    return {
        "description": "peerd wire messages (proto/wire.cddl). messages: one message each; "
        "encoding 'message' must give exactly cbor_hex and decoding cbor_hex must give "
        "'message'. datagrams: decode_packet(cbor_hex) gives 'messages' and skips 'errors'. "
        "invalid: decoding cbor_hex as one message fails with 'reason'.",
        "messages": messages,
        "datagrams": datagrams,
        "invalid": invalid_out,
    }


def seal_vectors(ping_packet: bytes) -> dict[str, Any]:
    from peerd.wire import seal

    key = bytes(range(32))
    other_key = bytes(range(32, 64))
    sender = bytes(range(0x10, 0x20))

    def sealed(name: str, epoch: int, counter: int, payload: bytes, nonce: bytes) -> dict[str, Any]:
        s = seal.Sealer(seal.Keyring([key]), sender, epoch, lambda n: nonce, counter=counter)
        return {
            "name": name,
            "sender_id_hex": sender.hex(),
            "epoch": epoch,
            "counter": counter,
            "nonce_hex": nonce.hex(),
            "payload_hex": payload.hex(),
            "envelope_hex": s.seal(payload).hex(),
        }

    def plain(name: str, epoch: int, counter: int, payload: bytes) -> dict[str, Any]:
        s = seal.Sealer(seal.Keyring(), sender, epoch, counter=counter)
        return {
            "name": name,
            "sender_id_hex": sender.hex(),
            "epoch": epoch,
            "counter": counter,
            "payload_hex": payload.hex(),
            "envelope_hex": s.seal(payload).hex(),
        }

    sealed_vectors = [
        sealed("ping-datagram", 7, 0, ping_packet, bytes(range(0xA0, 0xAC))),
        sealed("empty-payload-large-counter", 4294967295, 2**40 + 5, b"", bytes(range(0xB0, 0xBC))),
    ]
    plain_vectors = [plain("ping-datagram", 7, 0, ping_packet)]

    good = bytes.fromhex(sealed_vectors[0]["envelope_hex"])
    flipped = bytearray(good)
    flipped[-1] ^= 0x01
    other_id = seal.key_id(other_key)
    rejected = [
        ("bit-flip-in-tag", "keyed", bytes(flipped), "auth_failed"),
        ("header-changed", "keyed", good[:5] + bytes([good[5] ^ 0x80]) + good[6:], "auth_failed"),
        ("unknown-key-id", "keyed", good[:1] + other_id + good[5:], "unknown_key"),
        ("truncated", "keyed", good[: seal.SEALED_OVERHEAD - 1], "malformed"),
        ("unknown-version", "keyed", b"\x03" + good[1:], "malformed"),
        (
            "plaintext-to-keyed",
            "keyed",
            bytes.fromhex(plain_vectors[0]["envelope_hex"]),
            "plaintext_rejected",
        ),
        ("sealed-to-plaintext", "plaintext", good, "encrypted_rejected"),
        (
            "plaintext-with-key-id",
            "plaintext",
            bytes.fromhex(plain_vectors[0]["envelope_hex"])[:1]
            + other_id
            + bytes.fromhex(plain_vectors[0]["envelope_hex"])[5:],
            "malformed",
        ),
    ]
    rejected_out = []
    for name, mode, data, reason in rejected:
        opener = seal.Opener(seal.Keyring([key] if mode == "keyed" else []))
        try:
            opener.open(data)
        except seal.SealError as err:
            assert err.reason == reason, (name, err)
        else:
            raise AssertionError(f"{name} opened")
        rejected_out.append(
            {"name": name, "mode": mode, "envelope_hex": data.hex(), "reason": reason}
        )

    return {
        "description": "peerd envelope (proto/wire.cddl section 2). sealed: with 'key' and "
        "the given nonce (fixed here for reproducibility; never reuse one in real life), "
        "sealing payload as (sender_id, epoch, counter) gives exactly envelope_hex, and "
        "opening it gives sender_id and payload. plaintext: the same without a key. "
        "rejected: a fresh opener ('keyed' = holds 'key', 'plaintext' = no key) rejects "
        "envelope_hex with 'reason'.",
        "key": seal.format_key(key),
        "key_hex": key.hex(),
        "key_id_hex": seal.key_id(key).hex(),
        "other_key": seal.format_key(other_key),
        "other_key_id_hex": other_id.hex(),
        "sealed_overhead": seal.SEALED_OVERHEAD,
        "plaintext_overhead": seal.PLAIN_OVERHEAD,
        "sealed": sealed_vectors,
        "plaintext": plain_vectors,
        "rejected": rejected_out,
    }


def api_vectors() -> dict[str, Any]:
    """Frames of the local API (proto/api.cddl), built by the daemon's own
    encoders where it has them (status, members, registry entries and events,
    user and message events), so the CDDL check in proto/validate.py checks
    what the daemon sends."""
    from peerd.api.protocol import (
        Event,
        ReplyTo,
        Request,
        Response,
        encode_frame,
        member_event_to_wire,
        member_to_wire,
        message_event_to_wire,
        reg_entry_to_wire,
        registry_event_to_wire,
        snapshot_end_to_wire,
        snapshot_entry_to_wire,
        snapshot_member_to_wire,
        status_to_wire,
        user_event_to_wire,
        with_topic,
    )
    from peerd.core.events import (
        EventKind,
        MemberEvent,
        MemberInfo,
        RegEventKind,
        RegistryEvent,
    )
    from peerd.wire import seal
    from peerd.wire.messages import RegEntry, RegKind, Status

    a = bytes.fromhex("a1a2a3a4a5a6a7a8a9aaabacadaeafb0")
    b = bytes.fromhex("b1b2b3b4b5b6b7b8b9babbbcbdbebfc0")
    web1 = MemberInfo(
        a,
        "web-1",
        ("192.0.2.1", 7950),
        Status.ALIVE,
        3,
        17,
        (("role", "web"), ("zone", "eu-west-1b")),
    )
    db1 = MemberInfo(b, "db-1", ("2001:db8::7", 7950), Status.SUSPECT, 0, 2, ())
    primary = RegEntry(
        1, RegKind.NAME, "default", "db-primary", 1763769600000, 4242, 1000, (("role", "primary"),)
    )
    late = RegEntry(9, RegKind.NAME, "default", "db-primary", 1763769600250, 77, 0, ())
    worker = RegEntry(2, RegKind.GROUP, "jobs", "workers", 1763769601000, 4243, 1000, ())
    key = seal.format_key(bytes(range(32)))

    out: list[dict[str, Any]] = []

    def add(
        name: str, frame: Request | Response | Event, rule: str, parts: dict[str, str] | None = None
    ) -> None:
        out.append(
            {
                "name": name,
                "rule": rule,
                "parts": parts or {},
                "frame_hex": encode_frame(frame).hex(),
            }
        )

    def request(
        name: str, op: str, args: dict[str, Any] | None = None, args_rule: str | None = None
    ) -> None:
        add(
            name,
            Request(len(out) + 1, op, args or {}),
            "client-frame",
            {"args": args_rule} if args_rule else None,
        )

    # Requests: one per op, with every optional argument somewhere.
    request("status", "status")
    request("members", "members")
    request(
        "set-tags",
        "set-tags",
        {"tags": {"role": "web", "old": None}, "replace": False},
        "set-tags-args",
    )
    request("leave", "leave")
    request("join", "join", {"addrs": ["192.0.2.7:7950", "[2001:db8::1]:7950"]}, "join-args")
    request("keys-list", "keys.list")
    request("keys-list-file", "keys.list", {"file": True}, "keys-list-args")
    request("keys-install", "keys.install", {"key": key}, "key-args")
    request("keys-use", "keys.use", {"key": key}, "key-args")
    request("keys-remove", "keys.remove", {"key": key}, "key-args")
    request("keys-install-force", "keys.install", {"key": key, "force": True}, "key-args")
    request("keys-use-id-cluster", "keys.use", {"key": "1a2b3c4d", "cluster": True}, "key-args")
    request("keys-remove-prefix", "keys.remove", {"key": "1a2b"}, "key-args")
    request("watch", "watch", {"topics": ["members", "registry", "events"]}, "watch-args")
    request(
        "watch-snapshot",
        "watch",
        {"topics": ["members", "registry"], "snapshot": True},
        "watch-args",
    )
    request("unwatch", "unwatch", {"stream": 10}, "unwatch-args")
    request("register", "register", {"name": "db-primary"}, "register-args")
    request(
        "register-settled",
        "register",
        {
            "name": "db-primary",
            "scope": "default",
            "meta": {"role": "primary"},
            "wait": "settled",
            "timeout_s": 2.5,
        },
        "register-args",
    )
    request(
        "unregister", "unregister", {"name": "db-primary", "scope": "default"}, "unregister-args"
    )
    request(
        "update-name", "update", {"name": "db-primary", "meta": {"role": "replica"}}, "update-args"
    )
    request(
        "update-group", "update", {"group": "workers", "scope": "jobs", "meta": {}}, "update-args"
    )
    request(
        "register-no-messages",
        "register",
        {"name": "job-1", "messages": False, "wait": "settled"},
        "register-args",
    )
    request("lookup", "lookup", {"name": "db-primary"}, "lookup-args")
    request(
        "list",
        "list",
        {"scope": "default", "prefix": "db-", "after": ["default", "db-a"], "limit": 100},
        "list-args",
    )
    request(
        "group-join",
        "group.join",
        {"group": "workers", "scope": "jobs", "meta": {"slots": "4"}},
        "group-join-args",
    )
    request("group-leave", "group.leave", {"group": "workers", "scope": "jobs"}, "group-leave-args")
    request(
        "group-members",
        "group.members",
        {"group": "workers", "scope": "jobs", "limit": 10},
        "group-members-args",
    )
    request("groups", "groups", {"scope": "jobs"}, "groups-args")
    request("event", "event", {"name": "deploy", "payload": b"v1.2.3"}, "event-args")
    request("event-text", "event", {"name": "reload"}, "event-args")
    request("send-name", "send", {"name": "db-primary", "payload": "hello"}, "send-args")
    request(
        "send-group-all",
        "send",
        {"group": "workers", "scope": "jobs", "all": True, "payload": b"\x00\x01"},
        "send-args",
    )
    request(
        "send-reply",
        "send",
        {"reply_to": ReplyTo(b, 3, 41).token(), "payload": b"pong"},
        "send-args",
    )

    # Responses, with the result built as the daemon builds it.
    def ok(name: str, result: Any, result_rule: str) -> None:
        add(name, Response.success(len(out) + 1, result), "server-frame", {"result": result_rule})

    ok("status-result", status_to_wire(web1, 0, [web1, db1], version="0.1.0"), "status-result")
    ok("members-result", [member_to_wire(web1), member_to_wire(db1)], "members-result")
    ok("set-tags-result", {"role": "web"}, "set-tags-result")
    ok("join-result", {"ok": 1, "failed": 1}, "join-result")
    ok(
        "keys-list-result",
        [{"id": seal.key_id(bytes(range(32))).hex(), "primary": True, "installed": True}],
        "keys-list-result",
    )
    ok(
        "keys-list-result-key-file-differs",
        [
            {
                "id": "1a2b3c4d",
                "primary": True,
                "installed": True,
                "in_file": False,
                "file_primary": False,
            },
            {
                "id": "0badf00d",
                "primary": False,
                "installed": True,
                "in_file": True,
                "file_primary": True,
            },
            {
                "id": "5eed5eed",
                "primary": False,
                "installed": False,
                "in_file": True,
                "file_primary": False,
            },
        ],
        "keys-list-result",
    )
    ok(
        "keys-cluster-result",
        {
            "nodes": [
                {
                    "name": "web-1",
                    "id": "00" * 16,
                    "addr": "192.0.2.1:7950",
                    "ok": True,
                    "status": "ok",
                    "primary": "1a2b3c4d",
                    "keys": ["1a2b3c4d", "0badf00d"],
                },
                {
                    "name": "db-1",
                    "id": "11" * 16,
                    "addr": "192.0.2.2:7950",
                    "ok": False,
                    "status": "unreachable",
                    "message": "connect_timeout",
                },
            ],
            "ok": 1,
            "failed": 1,
        },
        "key-cluster-result",
    )
    ok("register-result", reg_entry_to_wire(a, primary, web1), "register-result")
    ok(
        "register-settled-result",
        {**reg_entry_to_wire(a, primary, web1), "settled": True, "won": True},
        "register-result",
    )
    ok("lookup-result", reg_entry_to_wire(b, primary), "lookup-result")
    ok(
        "list-result",
        {"entries": [reg_entry_to_wire(a, primary, web1)], "more": False},
        "list-result",
    )
    ok(
        "group-members-result",
        {"entries": [reg_entry_to_wire(a, worker)], "more": True},
        "group-members-result",
    )
    ok(
        "groups-result",
        {"groups": [{"scope": "jobs", "group": "workers", "members": 3}], "more": False},
        "groups-result",
    )
    ok("event-result", {"id": bytes(range(16)).hex()}, "event-result")
    ok("send-result", {"delivered": 1}, "send-result")
    ok(
        "send-all-result",
        {
            "delivered": 2,
            "failed": [{"node": b.hex(), "code": "unavailable", "message": "mailbox full"}],
        },
        "send-result",
    )
    ok("empty-result", {}, "watch-result")
    add(
        "error",
        Response.failure(len(out) + 1, "conflict", "name 'db-primary' is held"),
        "server-frame",
    )
    add("bad-frame", Response.failure(None, "bad_frame", "not CBOR"), "server-frame")
    add(
        "error-no-receiver",
        Response.failure(
            len(out) + 1, "no_receiver", "default/job-1 is held by a process that takes no messages"
        ),
        "server-frame",
    )

    # Events, as the daemon fans them out.
    def event(name: str, stream: int, kind_and_data: tuple[str, dict[str, Any]], rule: str) -> None:
        add(name, Event(stream, kind_and_data[0], kind_and_data[1]), rule)

    # A watch stream's events name their topic (with_topic, as the runner does).
    event(
        "member-joined",
        10,
        with_topic(member_event_to_wire(MemberEvent(EventKind.JOINED, web1)), "members"),
        "member-event",
    )
    event(
        "member-name-conflict",
        10,
        with_topic(
            member_event_to_wire(MemberEvent(EventKind.NAME_CONFLICT, db1, web1)), "members"
        ),
        "member-event",
    )
    event(
        "registry-registered",
        10,
        with_topic(
            registry_event_to_wire(RegistryEvent(RegEventKind.REGISTERED, a, primary)), "registry"
        ),
        "registry-event",
    )
    event(
        "registry-conflict",
        10,
        with_topic(
            registry_event_to_wire(
                RegistryEvent(RegEventKind.CONFLICT, b, late, 3, (a, primary)), {a: web1}.get
            ),
            "registry",
        ),
        "registry-event",
    )
    event("snapshot-member", 11, snapshot_member_to_wire(web1), "snapshot-member-event")
    event("snapshot-members-end", 11, snapshot_end_to_wire("members", 1), "snapshot-end-event")
    event("snapshot-entry", 11, snapshot_entry_to_wire(a, primary, web1), "snapshot-entry-event")
    event("snapshot-entry-group", 11, snapshot_entry_to_wire(b, worker), "snapshot-entry-event")
    event("snapshot-registry-end", 11, snapshot_end_to_wire("registry", 2), "snapshot-end-event")
    event(
        "connection-conflict",
        0,
        registry_event_to_wire(RegistryEvent(RegEventKind.CONFLICT, b, late, 3, (a, primary))),
        "connection-event",
    )
    event(
        "user-event",
        10,
        with_topic(
            ("user", user_event_to_wire(bytes(range(16)), a, "deploy", b"v1.2.3", "web-1")),
            "events",
        ),
        "user-event",
    )
    event(
        "message",
        0,
        (
            "message",
            message_event_to_wire(
                "caller-1",
                b,
                RegKind.NAME,
                "default",
                "db-primary",
                b"hello",
                from_scope="default",
                reply_to=ReplyTo(b, 3, 41).token(),
            ),
        ),
        "message-event",
    )
    event(
        "message-reply",
        0,
        (
            "message",
            message_event_to_wire(
                "db-primary", a, None, "", "", b"pong", reply_to=ReplyTo(a, 7, 2).token()
            ),
        ),
        "message-event",
    )
    event(
        "message-anonymous",
        0,
        ("message", message_event_to_wire(None, b, RegKind.GROUP, "jobs", "workers", b"")),
        "message-event",
    )
    event(
        "end", 10, ("end", {"code": "unavailable", "message": "watcher fell behind"}), "end-event"
    )

    return {
        "description": "peerd local API frames (proto/api.cddl). frame_hex is one whole frame "
        "(4-byte big-endian length, then the CBOR body). The body matches the CDDL rule "
        "'rule'; each entry of 'parts' names a field of the body (args, result) and the rule "
        "that field matches. Built with the daemon's own encoders where it has them.",
        "frames": out,
    }


def all_vectors() -> dict[str, dict[str, Any]]:
    """Every vector file's content, by file name."""
    msgs = message_vectors()
    return {
        "messages.json": msgs,
        "seal.json": seal_vectors(bytes.fromhex(msgs["datagrams"][0]["cbor_hex"])),
        "api.json": api_vectors(),
    }


def render(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    """Write the vector files; with ``--check``, write nothing and exit 1
    (with a diff) if a committed file differs from what the code gives."""
    import difflib

    check = argv == ["--check"]
    if argv and not check:
        print("usage: generate.py [--check]", file=sys.stderr)
        return 2
    stale = 0
    files = all_vectors()
    for name, data in files.items():
        path = HERE / name
        text = render(data)
        if not check:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
            continue
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        if old != text:
            stale += 1
            diff = difflib.unified_diff(
                old.splitlines(True),
                text.splitlines(True),
                f"{name} (committed)",
                f"{name} (generated)",
                n=1,
            )
            sys.stdout.writelines(list(diff)[:200])
    if check:
        print(f"vectors: {len(files)} files, {stale} differ from the generator")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
