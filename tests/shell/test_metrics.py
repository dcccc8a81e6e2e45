"""Metrics: counting messages by type, the Prometheus text, the HTTP endpoint."""

from __future__ import annotations

import collections
import re
import socket
from typing import Any

import cbor2
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from peerd.shell.metrics import (
    CONTENT_TYPE,
    TrafficCounter,
    message_sizes,
    open_metrics_socket,
    render,
    serve_http,
    stream_message_type,
)
from peerd.wire import codec
from peerd.wire.messages import (
    Ack,
    Alive,
    MemberState,
    Ping,
    PingReq,
    PushPull,
    Status,
    Suspect,
)

A, B = b"\x01" * 16, b"\x02" * 16

# --- messages by type ---------------------------------------------------------------


def test_message_sizes_attributes_every_byte_of_every_message() -> None:
    msgs = [
        Ping(7, A),
        Ack(7),
        Suspect(B, 3, A),
        Alive(A, "web1", ("10.0.0.1", 7950), 4, 2, (("role", "db"), ("zone", "a"))),
        PingReq(9, B, ("::1", 7950), True),
    ]
    encoded = [codec.encode(m) for m in msgs]
    payload = codec.pack(encoded)
    assert message_sizes(payload) == [
        ("ping", len(encoded[0])),
        ("ack", len(encoded[1])),
        ("suspect", len(encoded[2])),
        ("alive", len(encoded[3])),
        ("pingreq", len(encoded[4])),
    ]
    # A datagram of 30 messages: the packet header takes 2 bytes, not attributed.
    many = codec.pack([codec.encode(Ack(i)) for i in range(30)])
    sizes = message_sizes(many)
    assert len(sizes) == 30 and sum(n for _, n in sizes) == len(many) - 2


def test_stream_frames_are_one_message() -> None:
    pp = PushPull(True, (MemberState(A, "a", ("10.0.0.1", 7950), 1, 1, (), Status.ALIVE),))
    assert stream_message_type(codec.encode(pp)) == "pushpull"
    assert stream_message_type(b"") == "malformed"
    assert stream_message_type(cbor2.dumps([99, 1])) == "unknown"
    assert stream_message_type(cbor2.dumps({"a": 1})) == "unknown"


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xa0",  # a map, not an array
        b"\x82\x82\x01",  # truncated
        b"\x9b\xff\xff\xff\xff\xff\xff\xff\xff",  # claims 2**64-1 messages
        b"\x81\x9f\x01\xff",  # indefinite length
        b"\x81\x82\x01\x5a\xff\xff\xff\xff",  # a byte string longer than the datagram
        codec.pack([codec.encode(Ack(1))]) + b"\x00",  # trailing bytes
    ],
)
def test_malformed_datagrams_are_counted_whole(payload: bytes) -> None:
    assert message_sizes(payload) == [("malformed", len(payload))]


def test_unknown_message_types_keep_their_size() -> None:
    odd = cbor2.dumps([200, "future"])
    payload = codec.pack([odd, codec.encode(Ack(1))])
    assert message_sizes(payload) == [("unknown", len(odd)), ("ack", len(codec.encode(Ack(1))))]


@given(st.binary(max_size=200))
def test_message_sizes_never_raises(data: bytes) -> None:
    sizes = message_sizes(data)
    assert sum(n for _, n in sizes) <= len(data)


def test_traffic_counter() -> None:
    counters: collections.Counter[str] = collections.Counter()
    traffic = TrafficCounter(counters)
    traffic.packet("out", codec.pack([codec.encode(Ping(1, A)), codec.encode(Ack(2))]))
    traffic.packet("in", b"junk")
    traffic.stream("in", codec.encode(PushPull(False, ())))
    assert counters["wire_out.ping"] == 1 and counters["wire_out.ack"] == 1
    assert counters["wire_out_bytes.ack"] == len(codec.encode(Ack(2)))
    assert counters["wire_in.malformed"] == 1 and counters["wire_in_bytes.malformed"] == 4
    assert counters["wire_in.pushpull"] == 1


# --- the text format ------------------------------------------------------------------

_METRIC = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(rf"({_METRIC})(?:\{{({_LABEL}(?:,{_LABEL})*)?\}})? (\S+)")


def parse_exposition(text: str) -> dict[str, dict[str, Any]]:
    """A strict reader of the text format: every family declared once with
    HELP then TYPE, its samples contiguous right after, no sample twice."""
    assert text.endswith("\n")
    families: dict[str, dict[str, Any]] = {}
    current: str | None = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert name not in families, f"{name} declared twice"
            families[name] = {"help": line.split(" ", 3)[3], "samples": {}}
            current = None
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name in families and "type" not in families[name]
            assert kind in ("counter", "gauge")
            families[name]["type"] = kind
            current = name
        else:
            m = _SAMPLE.fullmatch(line)
            assert m is not None, f"bad sample line {line!r}"
            name, labels, value = m.groups()
            assert name == current, f"{name} outside its family"
            float(value)
            assert labels not in families[name]["samples"], f"duplicate {line}"
            families[name]["samples"][labels or ""] = float(value)
            if families[name]["type"] == "counter":
                assert name.endswith("_total")
    return families


STATUS: dict[str, Any] = {
    "name": "web1",
    "id": "ab" * 16,
    "addr": "10.0.0.1:7950",
    "incarnation": 3,
    "generation": 2,
    "health": 1,
    "version": "0.1.0",
    "leaving": False,
    "members": {"alive": 3, "suspect": 1, "dead": 0, "left": 2},
    "gauges": {"api_connections": 2, "keys": 1, "uptime_s": 12.5},
    "counters": {
        "probes": 10,
        "probe_failures": 1,
        "suspicions": 2,
        "refutations": 1,
        "dead": 1,
        "left": 2,
        "packets_in": 40,
        "bytes_out": 9000,
        "msg_in.ping": 5,
        "wire_in.ping": 5,
        "wire_out.ack": 5,
        "wire_out_bytes.ack": 10,
        "wire_in_bytes.pushpull": 700,
        "drop.bad_cbor": 3,
        "udp_drop_seal_auth": 4,
        "tcp_drop_closed": 1,
        "udp_rx": 40,
        "udp_tx": 41,
        "api_connections": 7,
        "api_requests": 12,
        "api_bad_frames": 1,
        "brand_new_counter": 9,
        "tcp_link_up": 1,
        "tcp_fail_timeout": 2,
        "watch_dropped": 1,
    },
}


def test_render_is_valid_exposition_with_the_expected_families() -> None:
    fams = parse_exposition(render(STATUS))
    assert fams["peerd_members"]["type"] == "gauge"
    assert fams["peerd_members"]["samples"] == {
        'status="alive"': 3,
        'status="dead"': 0,
        'status="left"': 2,
        'status="suspect"': 1,
    }
    assert fams["peerd_probes_total"]["samples"] == {"": 10}
    assert fams["peerd_suspicions_total"]["samples"] == {"": 2}
    assert fams["peerd_refutations_total"]["samples"] == {"": 1}
    assert fams["peerd_member_transitions_total"]["samples"] == {
        'status="dead"': 1,
        'status="left"': 2,
    }
    assert fams["peerd_messages_total"]["samples"] == {
        'direction="in",type="ping"': 5,
        'direction="out",type="ack"': 5,
    }
    assert fams["peerd_message_bytes_total"]["samples"] == {
        'direction="in",type="pushpull"': 700,
        'direction="out",type="ack"': 10,
    }
    assert fams["peerd_drops_total"]["samples"] == {
        'layer="core",reason="bad_cbor"': 3,
        'layer="udp",reason="seal_auth"': 4,
        'layer="tcp",reason="closed"': 1,
        'layer="api",reason="slow_watcher"': 1,
    }
    assert fams["peerd_api_connections"]["samples"] == {"": 2}
    assert fams["peerd_api_connections_total"]["samples"] == {"": 7}
    assert fams["peerd_api_errors_total"]["samples"] == {'kind="bad_frames"': 1}
    assert fams["peerd_health_score"]["samples"] == {"": 1}
    assert fams["peerd_uptime_seconds"]["samples"] == {"": 12.5}
    assert fams["peerd_build_info"]["samples"] == {'version="0.1.0"': 1}
    assert fams["peerd_other_total"]["samples"] == {'name="brand_new_counter"': 9}
    assert fams["peerd_leaving"]["samples"] == {"": 0}


def test_render_escapes_label_values_and_survives_odd_input() -> None:
    text = render(
        {
            "version": 'x"y\\z\nw',
            "counters": {"a\nb": 1, "c": "not a number"},
            "gauges": {"keys": True},
            "members": "nonsense",
        }
    )
    fams = parse_exposition(text)
    assert fams["peerd_build_info"]["samples"] == {'version="x\\"y\\\\z\\nw"': 1}
    assert fams["peerd_other_total"]["samples"] == {'name="a\\nb"': 1}
    assert "peerd_keys" not in fams  # a bool is not a number


def test_render_of_an_empty_status() -> None:
    assert parse_exposition(render({}))["peerd_build_info"]["samples"] == {'version="unknown"': 1}


# --- HTTP -------------------------------------------------------------------------------


async def _http(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def test_http_endpoint_serves_the_same_text() -> None:
    sock = open_metrics_socket(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    calls = 0

    async def snapshot() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return STATUS

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_http, sock, snapshot)
        reply = await _http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert f"Content-Type: {CONTENT_TYPE}".encode() in head
        assert f"Content-Length: {len(body)}".encode() in head
        assert body.decode() == render(STATUS)
        reply = await _http(port, b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200 OK") and reply.endswith(b"\r\n\r\n")
        assert (await _http(port, b"GET /nope HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404 ")
        assert (await _http(port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405 ")
        assert (await _http(port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        assert (await _http(port, b"GET /" + b"a" * 9000)).startswith(b"HTTP/1.1 431 ")
        assert calls == 2
        nursery.cancel_scope.cancel()


async def test_http_endpoint_reports_a_failing_snapshot() -> None:
    sock = open_metrics_socket(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    async def snapshot() -> dict[str, Any]:
        raise RuntimeError("the daemon is shutting down")

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_http, sock, snapshot)
        reply = await _http(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 503 ")
        assert reply.endswith(b"the daemon is shutting down\n")
        nursery.cancel_scope.cancel()


def test_metrics_address_in_use_is_a_clear_error() -> None:
    from peerd.shell.metrics import MetricsBindError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsBindError, match=f"127.0.0.1:{port}"):
            open_metrics_socket(("127.0.0.1", port))
