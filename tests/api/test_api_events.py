"""User events on the API: argument checks, the broadcast payload codec, CLI lines."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerd.api.protocol import (
    MAX_EVENT_BYTES,
    ApiError,
    Event,
    decode_user_event,
    encode_user_event,
    parse_event_args,
)
from peerd.cli import build_parser, format_user_event, show_payload


def test_event_args() -> None:
    a = parse_event_args({"name": "deploy", "payload": "v1"})
    assert (a.name, a.payload) == ("deploy", b"v1")
    assert parse_event_args({"name": "x"}).payload == b""
    for bad in ({}, {"name": ""}, {"name": 3}, {"name": "x", "payload": 5}, {"name": "n" * 129}):
        with pytest.raises(ApiError) as e:
            parse_event_args(bad)
        assert e.value.code == "bad_args"


def test_event_size_limit_is_a_clear_error() -> None:
    parse_event_args({"name": "x", "payload": b"y" * (MAX_EVENT_BYTES - 1)})
    with pytest.raises(ApiError) as e:
        parse_event_args({"name": "x", "payload": b"y" * MAX_EVENT_BYTES})
    assert e.value.message == (
        f"event is {MAX_EVENT_BYTES + 1} bytes (name + payload), over "
        f"the {MAX_EVENT_BYTES}-byte limit"
    )


@given(st.text(min_size=1, max_size=50), st.binary(max_size=300))
def test_user_event_roundtrip(name: str, payload: bytes) -> None:
    assert decode_user_event(encode_user_event(name, payload)) == (name, payload)


@given(st.binary(max_size=400))
@settings(max_examples=500)
def test_user_event_decoder_never_raises(data: bytes) -> None:
    out = decode_user_event(data)
    assert out is None or (isinstance(out[0], str) and isinstance(out[1], bytes))


def test_decoder_refuses_trailing_bytes_and_wrong_shapes() -> None:
    good = encode_user_event("a", b"b")
    assert decode_user_event(good + b"\x00") is None
    import cbor2

    for obj in ([], ["a"], ["a", "b"], [1, b""], ["", b""], {"a": 1}, ["a", b"b", 1]):
        assert decode_user_event(cbor2.dumps(obj)) is None


def test_cli_event_line_and_parser() -> None:
    ev = Event(
        5,
        "user",
        {
            "name": "deploy",
            "payload": b"v42",
            "origin": "ab" * 16,
            "origin_name": "web1",
            "id": "00" * 16,
        },
    )
    line = format_user_event(ev)
    assert line.endswith("event deploy from=web1 payload=v42")
    assert show_payload(b"\x00\xff") == "0x00ff"
    args = build_parser().parse_args(["event", "deploy", "v42"])
    assert (args.name, args.payload) == ("deploy", "v42")
    args = build_parser().parse_args(["watch", "--topic", "events"])
    assert args.topic == ["events"]
