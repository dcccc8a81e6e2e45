"""Codec: round trips, limits, strict typing, and robustness on hostile bytes."""

from __future__ import annotations

import contextlib
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peerd.wire import codec
from peerd.wire.codec import DecodeError, EncodeError
from peerd.wire.messages import (
    MESSAGE_TYPES,
    Ack,
    Alive,
    Dead,
    Left,
    MemberState,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Status,
    Suspect,
)

from . import strategies as ws

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

N1 = bytes(range(16))
N2 = bytes(range(16, 32))
IP4 = bytes([192, 0, 2, 1])


def raw(obj: Any) -> bytes:
    return bytes(cbor2.dumps(obj))


def decode_reason(data: bytes) -> str:
    with pytest.raises(DecodeError) as info:
        codec.decode(data)
    return info.value.reason


def alive_obj(**over: Any) -> list[Any]:
    fields: dict[str, Any] = {
        "node": N1,
        "name": "n",
        "addr": [IP4, 1],
        "inc": 0,
        "gen": 0,
        "tags": {},
    }
    fields.update(over)
    return [5, *fields.values()]


def member_obj(**over: Any) -> list[Any]:
    fields: dict[str, Any] = {
        "node": N1,
        "name": "n",
        "addr": [IP4, 1],
        "inc": 0,
        "gen": 0,
        "tags": {},
        "status": 0,
    }
    fields.update(over)
    return list(fields.values())


# --- round trips --------------------------------------------------------------


@pytest.mark.parametrize("type_no", sorted(MESSAGE_TYPES))
@FAST
@given(data=st.data())
def test_round_trip_every_type(type_no: int, data: st.DataObject) -> None:
    msg = data.draw(ws.BY_TYPE[type_no])
    encoded = codec.encode(msg)
    assert codec.decode(encoded) == msg
    assert codec.from_cbor_obj(codec.to_cbor_obj(msg)) == msg
    # Deterministic: re-encoding what we decoded gives the same bytes.
    assert codec.encode(codec.decode(encoded)) == encoded


@FAST
@given(st.lists(ws.messages, max_size=8))
def test_packet_round_trip_and_size(msgs: list[Message]) -> None:
    encoded = [codec.encode(m) for m in msgs]
    packet = codec.pack(encoded)
    assert len(packet) == codec.array_header_size(len(msgs)) + sum(map(len, encoded))
    assert codec.decode_packet(packet) == (msgs, [])


@pytest.mark.parametrize("n", [0, 1, 23, 24, 255, 256, 65535, 65536])
def test_array_header_size_matches_pack(n: int) -> None:
    one = codec.encode(Ack(0))
    packet = codec.pack([one] * n)
    assert len(packet) == codec.array_header_size(n) + n * len(one)
    assert raw([[3, 0]] * n) == packet


def test_tags_are_encoded_in_deterministic_order() -> None:
    a = Alive(N1, "x", ("192.0.2.1", 1), 0, 0, (("b", "2"), ("aa", "1"), ("c", "3")))
    b = Alive(N1, "x", ("192.0.2.1", 1), 0, 0, (("c", "3"), ("aa", "1"), ("b", "2")))
    assert codec.encode(a) == codec.encode(b)
    # RFC 8949 order: shorter keys first, then bytewise.
    assert list(codec.to_cbor_obj(a)[6]) == ["b", "c", "aa"]
    assert codec.decode(codec.encode(a)).tags == (("aa", "1"), ("b", "2"), ("c", "3"))


def test_non_canonical_ip_text_round_trips_to_canonical_form() -> None:
    msg = PingReq(1, N1, ("2001:DB8:0::1", 7946), False)
    assert codec.decode(codec.encode(msg)).target_addr == ("2001:db8::1", 7946)


def test_extra_trailing_fields_are_ignored() -> None:
    assert codec.decode(raw([3, 7, "future", [1, 2]])) == Ack(7)
    member = member_obj(status=2) + ["future"]
    assert codec.decode(raw([9, False, [member]])) == PushPull(
        False, (MemberState(N1, "n", ("192.0.2.1", 1), 0, 0, (), Status.DEAD),)
    )


def test_non_shortest_integers_are_accepted() -> None:
    assert codec.decode(bytes.fromhex("82031b0000000000000005")) == Ack(5)


# --- limits -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "ok", "too_big"),
    [
        (lambda v: alive_obj(name=v), "é" * 127 + "a", "é" * 128),  # 255 vs 256 bytes
        (lambda v: alive_obj(tags={v: ""}), "k" * 64, "k" * 65),
        (lambda v: alive_obj(tags={"k": v}), "v" * 512, "v" * 513),
    ],
)
def test_text_limits_on_decode(make: Any, ok: str, too_big: str) -> None:
    codec.decode(raw(make(ok)))
    assert decode_reason(raw(make(too_big))) == "bad_field"


def test_tag_count_limit() -> None:
    codec.decode(raw(alive_obj(tags={str(i): "" for i in range(64)})))
    assert decode_reason(raw(alive_obj(tags={str(i): "" for i in range(65)}))) == "bad_field"
    tags = tuple((f"{i:02}", "") for i in range(65))
    with pytest.raises(EncodeError):
        codec.encode(Alive(N1, "x", ("192.0.2.1", 1), 0, 0, tags))


def test_u64_limits() -> None:
    assert codec.decode(raw([3, 2**64 - 1])) == Ack(2**64 - 1)
    assert decode_reason(raw([3, 2**64])) == "bad_cbor"  # needs a bignum tag
    assert decode_reason(raw([3, -1])) == "bad_field"


# --- wrong field types on decode ------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ([1, "1", N1], "bad_field"),
        ([1, 1.0, N1], "bad_field"),
        ([1, True, N1], "bad_field"),
        ([1, None, N1], "bad_field"),
        ([1, 1, N1[:15]], "bad_field"),
        ([1, 1, N1 + b"x"], "bad_field"),
        ([1, 1, N1.hex()], "bad_field"),
        ([2, 1, N1, [IP4, 1], 0], "bad_field"),
        ([2, 1, N1, [IP4, 1, 2], False], "bad_field"),
        ([2, 1, N1, [IP4 + b"x", 1], False], "bad_field"),
        ([2, 1, N1, ["192.0.2.1", 1], False], "bad_field"),
        ([2, 1, N1, [IP4, 65536], False], "bad_field"),
        ([2, 1, N1, [IP4, -1], False], "bad_field"),
        ([2, 1, N1, {"ip": IP4}, False], "bad_field"),
        (alive_obj(name=b"n"), "bad_field"),
        (alive_obj(tags=[["k", "v"]]), "bad_field"),
        (alive_obj(tags={"k": 1}), "bad_field"),
        (alive_obj(gen=-5), "bad_field"),
        ([6, N1, 1, "sender"], "bad_field"),
        ([7, N1, 1.5, N2], "bad_field"),
        ([8, N1, False], "bad_field"),
        ([9, 1, []], "bad_field"),
        ([9, False, {}], "bad_field"),
        ([9, False, [member_obj(status=4)]], "bad_field"),
        ([9, False, [member_obj(status=True)]], "bad_field"),
        ([9, False, [member_obj()[:6]]], "bad_field"),
        ([9, False, ["member"]], "bad_field"),
        ([1, 1], "bad_arity"),
        ([5, N1, "n", [IP4, 1], 0, 0], "bad_arity"),
        ([], "not_message"),
        ({"type": 1}, "not_message"),
        (["ping", 1, N1], "not_message"),
        ([True, 1], "not_message"),
        ([0], "unknown_type"),
        ([10, 1], "unknown_type"),
        ([-1], "unknown_type"),
    ],
)
def test_decode_rejects_wrong_fields(obj: Any, reason: str) -> None:
    assert decode_reason(raw(obj)) == reason


# --- CBOR-level restrictions --------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        raw([3, 1]) + b"\x00",  # trailing bytes
        b"\xc1" + raw([3, 1]),  # any tag
        b"\x82\x03\xc1\x01",  # tag inside
        b"\xd8\x1e\x82\x01\x02",  # rational
        b"\xd9\xd9\xf7" + raw([3, 1]),  # self-describe tag
        b"\x9f\x03\x01\xff",  # indefinite array
        b"\x82\x03\x5f\x41\x01\xff",  # indefinite byte string
        raw(alive_obj())[:-1] + b"\xa2\x61k\x60\x61k\x60",  # duplicate map key
        raw(alive_obj())[:-1] + b"\xa1\x01\x60",  # non-text map key
        b"\x81" * (codec.MAX_DEPTH + 1) + b"\x00",  # too deep
        b"\x81" * 100_000,  # much too deep and truncated
        b"\x82\x03\x62\xff\xfe",  # invalid UTF-8
        b"\x9b\xff\xff\xff\xff\xff\xff\xff\xff",  # absurd declared length
        b"\x5b\x7f\xff\xff\xff\xff\xff\xff\xff",
    ],
)
def test_cbor_restrictions(data: bytes) -> None:
    assert decode_reason(data) == "bad_cbor"
    with pytest.raises(DecodeError):
        codec.decode_packet(data)


def test_decode_packet_skips_bad_messages() -> None:
    good = codec.encode(Ping(1, N1))
    packet = codec.pack([good, raw([10, 1]), raw("junk"), raw([1, 1]), good])
    msgs, errors = codec.decode_packet(packet)
    assert msgs == [Ping(1, N1), Ping(1, N1)]
    assert [e.reason for e in errors] == ["unknown_type", "not_message", "bad_arity"]


@pytest.mark.parametrize("data", [raw({}), raw(3), raw(b"x"), raw("x")])
def test_decode_packet_requires_array(data: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        codec.decode_packet(data)
    assert info.value.reason == "not_packet"


# --- encode-side checks ---------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        Ping(-1, N1),
        Ping(2**64, N1),
        Ping(True, N1),
        Ping(1.0, N1),  # type: ignore[arg-type]
        Ping(1, N1[:15]),
        Ping(1, bytearray(N1)),  # type: ignore[arg-type]
        PingReq(1, N1, ("not an ip", 1), False),
        PingReq(1, N1, ("fe80::1%eth0", 1), False),
        PingReq(1, N1, ("192.0.2.1", 65536), False),
        PingReq(1, N1, ("192.0.2.1",), False),  # type: ignore[arg-type]
        PingReq(1, N1, ["192.0.2.1", 1], False),  # type: ignore[arg-type]
        PingReq(1, N1, ("192.0.2.1", 1), 1),  # type: ignore[arg-type]
        Alive(N1, "x" * 256, ("192.0.2.1", 1), 0, 0, ()),
        Alive(N1, "\ud800", ("192.0.2.1", 1), 0, 0, ()),
        Alive(N1, "x", ("192.0.2.1", 1), 0, 0, (("k", "a"), ("k", "b"))),
        Alive(N1, "x", ("192.0.2.1", 1), 0, 0, (("k" * 65, ""),)),
        Alive(N1, "x", ("192.0.2.1", 1), 0, 0, (("k", 1),)),  # type: ignore[arg-type]
        Alive(N1, "x", ("192.0.2.1", 1), 0, 0, {"k": "v"}),  # type: ignore[arg-type]
        Alive(N1, "x", ("192.0.2.1", 1), 0, -1, ()),
        Suspect(N1, 1, "sender"),  # type: ignore[arg-type]
        Dead(N1, None, N2),  # type: ignore[arg-type]
        Left(N1[:1], 0),
        Nack("1"),  # type: ignore[arg-type]
        PushPull(False, [MemberState(N1, "", ("::", 0), 0, 0, (), Status.ALIVE)]),  # type: ignore[arg-type]
        PushPull(False, (MemberState(N1, "", ("::", 0), 0, 0, (), 0),)),  # type: ignore[arg-type]
        PushPull(False, (Ack(1),)),  # type: ignore[arg-type]
        PushPull(None, ()),  # type: ignore[arg-type]
    ],
)
def test_encode_rejects_invalid_messages(msg: Message) -> None:
    with pytest.raises(EncodeError):
        codec.encode(msg)


def test_encode_rejects_non_messages() -> None:
    with pytest.raises(TypeError):
        codec.encode(MemberState(N1, "", ("::", 0), 0, 0, (), Status.ALIVE))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        codec.to_cbor_obj([3, 1])  # type: ignore[arg-type]


def test_decode_error_carries_reason() -> None:
    err = DecodeError("bad_field", "seq must be ...")
    assert err.reason == "bad_field"
    assert isinstance(err, ValueError)
    assert str(err) == "bad_field: seq must be ..."


# --- robustness: nothing but DecodeError on hostile input ---------------------------


def assert_only_decode_errors(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        codec.decode(data)
    with contextlib.suppress(DecodeError):
        codec.decode_packet(data)


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_decode_error(data: bytes) -> None:
    assert_only_decode_errors(data)


_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64 - 1),
    st.floats(),
    st.binary(max_size=20),
    st.text(max_size=10),
    st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, N1, IP4, "192.0.2.1", [IP4, 1]]),
)
_values = st.one_of(
    _leaves,
    st.lists(_leaves, max_size=8),
    st.dictionaries(st.text(max_size=5), _leaves, max_size=4),
)


@FUZZ
@given(ws.messages, st.data())
def test_a_field_replaced_by_anything(msg: Message, data: st.DataObject) -> None:
    obj = codec.to_cbor_obj(msg)
    i = data.draw(st.integers(min_value=0, max_value=len(obj) - 1))
    obj[i] = data.draw(_values)
    try:
        out = codec.decode(raw(obj))
    except DecodeError:
        return
    # Accepted only if the replacement happened to be a valid value.
    assert codec.to_cbor_obj(out)[1:] == obj[1 : len(codec.to_cbor_obj(out))]


@FUZZ
@given(st.integers(min_value=0, max_value=11), st.lists(_values, max_size=9))
def test_structurally_plausible_garbage(type_no: int, fields: list[Any]) -> None:
    assert_only_decode_errors(raw([type_no, *fields]))
    assert_only_decode_errors(raw([[type_no, *fields]]))


@FUZZ
@given(st.lists(ws.messages, min_size=1, max_size=4), st.data())
def test_mutated_encodings_raise_only_decode_error(
    msgs: list[Message], data: st.DataObject
) -> None:
    packet = bytearray(codec.pack([codec.encode(m) for m in msgs]))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        i = data.draw(st.integers(min_value=0, max_value=len(packet)))
        if op == "cut":
            del packet[i:]
        elif op == "insert":
            packet[i:i] = data.draw(st.binary(min_size=1, max_size=4))
        elif i < len(packet):
            if op == "flip":
                packet[i] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
            elif op == "set":
                packet[i] = data.draw(st.integers(min_value=0, max_value=255))
            else:
                del packet[i]
    assert_only_decode_errors(bytes(packet))
