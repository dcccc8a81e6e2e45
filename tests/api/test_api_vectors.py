"""proto/vectors/api.json against the implementation.

proto/validate.py checks the same frames against proto/api.cddl with an
independent validator; here the daemon's and the client's own decoders must
accept every frame, and a request's args must pass the op's parser, so the
spec, the vectors and the code cannot drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from peerd.api import protocol as p
from peerd.wire.messages import RegKind

VECTORS = json.loads(
    (Path(__file__).resolve().parents[2] / "proto" / "vectors" / "api.json").read_text("utf-8")
)["frames"]

ARGS_PARSERS: dict[str, Callable[[Mapping[str, Any]], object]] = {
    "set-tags": p.parse_set_tags_args,
    "join": lambda a: p.parse_join_args(a, default_port=7950),
    "keys.list": p.parse_keys_list_args,
    "keys.install": lambda a: (p.parse_key_args(a), p.parse_key_flags(a)),
    "keys.use": lambda a: (p.parse_key_args(a), p.parse_key_flags(a)),
    "keys.remove": lambda a: (p.parse_key_args(a), p.parse_key_flags(a)),
    "watch": p.parse_watch_args,
    "unwatch": p.parse_unwatch_args,
    "register": p.parse_register_args,
    "group.join": lambda a: p.parse_register_args(a, RegKind.GROUP),
    "unregister": p.parse_target_args,
    "group.leave": lambda a: p.parse_target_args(a, RegKind.GROUP),
    "update": p.parse_update_args,
    "lookup": p.parse_target_args,
    "list": p.parse_list_args,
    "groups": p.parse_list_args,
    "group.members": lambda a: (p.parse_target_args(a, RegKind.GROUP), p.parse_limit_arg(a)),
    "event": p.parse_event_args,
    "send": p.parse_send_args,
}


def decode(vector: dict[str, Any]) -> dict[Any, Any]:
    decoder = p.FrameDecoder()
    decoder.feed(bytes.fromhex(vector["frame_hex"]))
    frame = decoder.next_frame()
    assert frame is not None and decoder.buffered == 0, "exactly one whole frame"
    return frame


def test_every_op_has_a_request_vector() -> None:
    ops = {decode(v)["op"] for v in VECTORS if v["rule"] == "client-frame"}
    assert ops == {op.value for op in p.Op}


@pytest.mark.parametrize(
    "vector", [v for v in VECTORS if v["rule"] == "client-frame"], ids=lambda v: v["name"]
)
def test_request_vector_is_accepted_by_the_server(vector: dict[str, Any]) -> None:
    request = p.parse_request(decode(vector))
    assert request.op in {op.value for op in p.Op}
    parser = ARGS_PARSERS.get(request.op)
    if parser is None:
        assert request.args == {}, f"{request.op} takes no args"
    else:
        parser(request.args)  # raises ApiError on args the daemon would refuse


@pytest.mark.parametrize(
    "vector", [v for v in VECTORS if v["rule"] != "client-frame"], ids=lambda v: v["name"]
)
def test_server_vector_is_accepted_by_the_client(vector: dict[str, Any]) -> None:
    parsed = p.parse_server_frame(decode(vector))
    if isinstance(parsed, p.Event):
        assert vector["rule"].endswith("event")
        assert (parsed.stream == p.CONNECTION_STREAM) == (
            vector["rule"] in ("connection-event", "message-event")
        )
    else:
        assert vector["rule"] == "server-frame"
        assert parsed.ok == ("result" in vector["parts"])


def test_message_event_data_is_what_the_client_reads() -> None:
    data = p.message_event_to_wire(None, bytes(16), RegKind.GROUP, "jobs", "workers", b"x")
    assert data == {
        "from": None,
        "from_scope": None,
        "from_node": "00" * 16,
        "kind": "group",
        "scope": "jobs",
        "name": "workers",
        "payload": b"x",
        "reply_to": None,
    }
    assert p.message_event_to_wire("me", bytes(16), RegKind.NAME, "s", "n", b"")["from"] == "me"


def test_user_event_data_names_the_origin_only_when_known() -> None:
    origin = bytes(range(16))
    assert "origin_name" not in p.user_event_to_wire(bytes(16), origin, "deploy", b"", None)
    data = p.user_event_to_wire(bytes(16), origin, "deploy", b"v1", "web-1")
    assert data == {
        "name": "deploy",
        "payload": b"v1",
        "id": "00" * 16,
        "origin": origin.hex(),
        "origin_name": "web-1",
    }
