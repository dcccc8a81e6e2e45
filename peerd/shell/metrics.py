"""Metrics in the Prometheus text exposition format (version 0.0.4).

One source, two ways out: ``peerd metrics`` asks the daemon for its
``status`` over the API socket and prints :func:`render` of it, and
``--metrics-addr`` (``metrics_addr`` in the config file) serves the very same
text over HTTP at ``/metrics`` for a Prometheus scraper (:func:`serve_http`).

The daemon keeps plain named counters (``probes``, ``drop.bad_cbor``,
``udp_drop_seal_auth``, ``api_connections``...); :func:`render` turns them
into metric families with labels by the rules in :data:`RULES`, so a new
drop reason shows up as a new label value without any change here. A counter
no rule knows is still exported, as ``peerd_other_total{name="..."}``.

Messages and bytes by message type are counted in the shell as they cross the
wire (:class:`TrafficCounter`, called by the runner for every datagram and
stream frame, before sealing and after opening). It reads only the CBOR
headers the wire spec (proto/wire.cddl) fixes: a datagram is an array of
messages, a message an array whose first item is its type number. A datagram
it cannot walk is counted whole under the type ``malformed``; the core then
drops it and counts why.

This module imports neither trio nor the core at load time: ``peerd metrics``
stays a light client.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import logging
import math
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peerd.wire.messages import MESSAGE_TYPES

if TYPE_CHECKING:
    import trio

log = logging.getLogger("peerd.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "peerd_"

TYPE_NAMES: dict[int, str] = {t: cls.__name__.lower() for t, cls in MESSAGE_TYPES.items()}


# --- counting messages by type -------------------------------------------------------


class _Malformed(Exception):
    pass


def _head(data: bytes, pos: int) -> tuple[int, int, int]:
    """(major type, argument, position after the head) of the CBOR item at ``pos``."""
    if pos >= len(data):
        raise _Malformed
    initial = data[pos]
    major, info = initial >> 5, initial & 0x1F
    pos += 1
    if info < 24:
        return major, info, pos
    if info > 27:  # reserved, or indefinite length (not allowed on our wire)
        raise _Malformed
    size = 1 << (info - 24)
    if pos + size > len(data):
        raise _Malformed
    return major, int.from_bytes(data[pos : pos + size], "big"), pos + size


def _skip(data: bytes, pos: int) -> int:
    """The position after the CBOR item at ``pos`` (headers only, no decoding)."""
    pending = 1
    while pending:
        pending -= 1
        major, arg, pos = _head(data, pos)
        if major in (2, 3):  # byte or text string
            pos += arg
            if pos > len(data):
                raise _Malformed
        elif major == 4:
            pending += arg
        elif major == 5:
            pending += 2 * arg
        elif major == 6:
            pending += 1
        # Every pending item takes at least one byte: a hostile count ends here.
        if pending > len(data) - pos:
            raise _Malformed
    return pos


def _message_type(data: bytes, pos: int) -> str:
    major, arity, pos = _head(data, pos)
    if major != 4 or arity == 0:
        return "unknown"
    major, number, _ = _head(data, pos)
    if major != 0:
        return "unknown"
    return TYPE_NAMES.get(number, "unknown")


def message_sizes(payload: bytes, trusted: bool = False) -> list[tuple[str, int]]:
    """``(type, encoded bytes)`` of each message in a datagram payload.

    The packet's own array header is not attributed to any message. A
    payload that is not a well-formed array gives ``[("malformed", len)]``.
    ``trusted`` (a payload we encoded ourselves): the last message is taken
    to end where the payload does, without walking it (a large registry
    delta is thousands of items).
    """
    try:
        major, count, pos = _head(payload, 0)
        if major != 4 or count > len(payload) - pos:
            raise _Malformed
        out: list[tuple[str, int]] = []
        for i in range(count):
            start = pos
            kind = _message_type(payload, pos)
            pos = len(payload) if trusted and i == count - 1 else _skip(payload, pos)
            out.append((kind, pos - start))
        if pos != len(payload):
            raise _Malformed
        return out
    except _Malformed:
        return [("malformed", len(payload))]


def stream_message_type(payload: bytes) -> str:
    """The type of the one message a stream frame carries."""
    try:
        return _message_type(payload, 0)
    except _Malformed:
        return "malformed"


class TrafficCounter:
    """Adds ``wire_in.<type>``, ``wire_in_bytes.<type>`` (and ``wire_out...``)
    to a counter set. Plaintext bytes: sealing adds a fixed overhead per
    datagram or frame, counted in neither."""

    def __init__(self, counters: collections.Counter[str]) -> None:
        self.counters = counters

    def packet(self, direction: str, payload: bytes) -> None:
        for kind, size in message_sizes(payload, trusted=direction == "out"):
            self.counters[f"wire_{direction}.{kind}"] += 1
            self.counters[f"wire_{direction}_bytes.{kind}"] += size

    def stream(self, direction: str, payload: bytes) -> None:
        kind = stream_message_type(payload)
        self.counters[f"wire_{direction}.{kind}"] += 1
        self.counters[f"wire_{direction}_bytes.{kind}"] += len(payload)


# --- rendering -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """Counters whose name matches ``pattern`` feed ``family``; the named
    groups of the pattern become labels, and ``labels`` adds fixed ones."""

    pattern: re.Pattern[str]
    family: str
    help: str
    labels: tuple[tuple[str, str], ...] = ()


def _rule(pattern: str, family: str, help: str, **labels: str) -> Rule:
    return Rule(re.compile(pattern), family, help, tuple(labels.items()))


RULES: tuple[Rule, ...] = (
    # membership protocol (core)
    _rule(r"probes", "probes_total", "Direct probes (pings) sent to a member."),
    _rule(
        r"probe_failures",
        "probe_failures_total",
        "Probes that got no ack, directly or through helpers.",
    ),
    _rule(
        r"indirect_probes",
        "indirect_probes_total",
        "Indirect probes (ping-req) sent after a missed direct ack.",
    ),
    _rule(r"suspicions", "suspicions_total", "Members this node started to suspect."),
    _rule(
        r"confirmations",
        "suspicion_confirmations_total",
        "Independent confirmations of a suspicion received (Lifeguard).",
    ),
    _rule(r"confirm_checks", "suspicion_confirm_checks_total", "Suspicion confirmations checked."),
    _rule(
        r"refutations",
        "refutations_total",
        "Times this node refuted a suspicion about itself (raised its incarnation).",
    ),
    _rule(
        r"(?P<status>dead|left)",
        "member_transitions_total",
        "Members this node marked dead or left.",
    ),
    _rule(r"joins", "joins_total", "Join attempts (at start and over the API)."),
    _rule(r"name_conflicts", "name_conflicts_total", "Two live nodes seen with the same name."),
    _rule(
        r"ghosts_(?P<what>found|reaped|kept|tombstones_evicted)",
        "replaced_members_total",
        "Down members whose name and address a new id took: found, reaped early, kept "
        "(revived, or the new id went down too); tombstones given up at the bound.",
    ),
    _rule(
        r"reconnects",
        "reconnects_total",
        "Attempts to reach a dead node or seed again (partition healing).",
    ),
    _rule(
        r"unreachable_hints",
        "closed_port_hints_total",
        "ICMP port-unreachable hints handed to the core.",
        source="icmp",
    ),
    _rule(
        r"link_closed_hints",
        "closed_port_hints_total",
        "ICMP port-unreachable hints handed to the core.",
        source="watch_link",
    ),
    _rule(
        r"push_pull_(?P<direction>in|out)",
        "push_pulls_total",
        "Full-state exchanges (push-pull), by who started them.",
    ),
    _rule(
        r"push_pull_(?P<result>failed|skipped)",
        "push_pull_problems_total",
        "Push-pull exchanges that failed or were skipped (too many running).",
    ),
    _rule(
        r"packets_(?P<direction>in|out)", "packets_total", "Datagrams handed to or from the core."
    ),
    _rule(
        r"bytes_(?P<direction>in|out)",
        "packet_bytes_total",
        "Plaintext datagram bytes handed to or from the core.",
    ),
    # by message type (shell, TrafficCounter) and as the core handled them
    _rule(
        r"wire_(?P<direction>in|out)\.(?P<type>\w+)",
        "messages_total",
        "Messages on the wire (datagrams and stream frames), by type.",
    ),
    _rule(
        r"wire_(?P<direction>in|out)_bytes\.(?P<type>\w+)",
        "message_bytes_total",
        "Encoded message bytes on the wire, by type (before sealing).",
    ),
    _rule(
        r"msg_in\.(?P<type>\w+)",
        "messages_handled_total",
        "Well-formed messages the core handled, by type.",
    ),
    # drops, by layer and reason
    _rule(r"drop\.(?P<reason>\w+)", "drops_total", "Input dropped, by reason.", layer="core"),
    _rule(r"udp_drop_(?P<reason>\w+)", "drops_total", "Input dropped, by reason.", layer="udp"),
    _rule(r"tcp_drop_(?P<reason>\w+)", "drops_total", "Input dropped, by reason.", layer="tcp"),
    _rule(
        r"watch_dropped",
        "drops_total",
        "Input dropped, by reason.",
        layer="api",
        reason="slow_watcher",
    ),
    # transport
    _rule(
        r"udp_(?P<direction>rx|tx)",
        "datagrams_total",
        "Sealed datagrams received and sent on the UDP socket.",
    ),
    _rule(
        r"udp_unreachable",
        "icmp_errors_total",
        "ICMP errors for datagrams we sent, by errno.",
        errno="econnrefused",
    ),
    _rule(
        r"udp_icmp_(?P<errno>\w+)",
        "icmp_errors_total",
        "ICMP errors for datagrams we sent, by errno.",
    ),
    _rule(
        r"tcp_(?P<direction>in|out)",
        "streams_total",
        "Push-pull streams served (in) and completed (out).",
    ),
    _rule(
        r"tcp_fail_(?P<reason>\w+)",
        "stream_failures_total",
        "Outgoing streams that failed, by reason.",
    ),
    _rule(
        r"tcp_link_(?P<event>\w+)",
        "watch_link_events_total",
        "Watch link events (up, closed, failed...).",
    ),
    _rule(
        r"tcp_links_accepted",
        "watch_link_events_total",
        "Watch link events (up, closed, failed...).",
        event="accepted",
    ),
    # local API
    _rule(r"api_connections", "api_connections_total", "API connections accepted."),
    _rule(r"api_requests", "api_requests_total", "API requests received."),
    _rule(
        r"api_refused\.(?P<reason>\w+)",
        "api_refusals_total",
        "API connections refused or closed, and events or messages refused, by the bound "
        "that was reached.",
    ),
    _rule(
        r"api_(?P<kind>refused_connections|bad_frames|internal_errors|accept_errors)",
        "api_errors_total",
        "API problems, by kind.",
    ),
    _rule(
        r"api_forbidden\.(?P<reason>\w+)\.(?P<op>[\w.-]+)",
        "api_forbidden_total",
        "API calls refused by the authorization policy (peerd.shell.authz), by rule and op.",
    ),
    # the daemon itself
    _rule(
        r"state_write_errors",
        "state_write_errors_total",
        "Failed writes to the state directory (incarnation, peers, keyring).",
    ),
    _rule(
        r"timers_deferred", "timers_deferred_total", "Runner turns that hit the per-turn timer cap."
    ),
    _rule(
        r"core_errors_(?P<kind>\w+)",
        "core_errors_total",
        "Inputs the core raised on (a bug): each dropped, the daemon went on; by input kind.",
    ),
    _rule(
        r"key_refused_by_(?P<by>us|peer)",
        "key_refusals_total",
        "Sealed traffic refused for its key (by us: a key we lack; by the peer: it "
        "closed after our first frame, likely a wrong cluster key).",
    ),
)

OTHER = ("other_total", "Counters without a dedicated metric, by name.")

GAUGES: dict[str, tuple[str, str]] = {
    # status gauge name -> (family, help)
    "api_connections": ("api_connections", "API connections open now."),
    "api_watchers": ("api_watchers", "API watch streams open now."),
    "api_mailbox_bytes": (
        "api_mailbox_bytes",
        "Bytes of messages waiting in all API mailboxes ([messages] mailbox_total_bytes).",
    ),
    "keys": ("keys", "Keys installed in the keyring (0: plaintext gossip)."),
    "timers_pending": ("timers_pending", "Core timers waiting in the runner."),
    "uptime_s": ("uptime_seconds", "Seconds since the runner started."),
    "registry_entries": ("registry_entries", "Entries in the local registry replica."),
    "tcp_preauth_connections": (
        "tcp_preauth_connections",
        "TCP connections whose first frame has not opened yet.",
    ),
    "tcp_preauth_bytes": ("tcp_preauth_bytes", "Bytes reserved by first frames being read."),
}


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Families:
    """Samples grouped by family, in the order families were first seen."""

    def __init__(self) -> None:
        self.meta: dict[str, tuple[str, str]] = {}
        self.samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}

    def add(
        self, family: str, kind: str, help: str, labels: Iterable[tuple[str, str]], value: float
    ) -> None:
        name = PREFIX + family
        self.meta.setdefault(name, (kind, help))
        key = tuple(sorted(labels))
        bucket = self.samples.setdefault(name, {})
        bucket[key] = bucket.get(key, 0) + value

    def text(self) -> str:
        lines: list[str] = []
        for name, (kind, help) in self.meta.items():
            lines.append(f"# HELP {name} {escape_help(help)}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in sorted(self.samples[name].items()):
                label_text = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels)
                sample = f"{name}{{{label_text}}}" if label_text else name
                lines.append(f"{sample} {format_number(value)}")
        return "\n".join(lines) + "\n"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def render(status: Mapping[str, Any]) -> str:
    """The Prometheus text for a ``status`` result (see the API's ``status``)."""
    fam = _Families()
    version = str(status.get("version", "unknown"))
    fam.add(
        "build_info",
        "gauge",
        "Always 1; the labels say which peerd this is.",
        [("version", version)],
        1,
    )
    members = status.get("members")
    if isinstance(members, Mapping):
        for state in ("alive", "suspect", "dead", "left"):
            fam.add(
                "members",
                "gauge",
                "Members this node knows, by status (itself included).",
                [("status", state)],
                _number(members.get(state, 0)) or 0,
            )
    for key, family, help in (
        (
            "health",
            "health_score",
            "Lifeguard local health: 0 is healthy; higher means this node is slow or "
            "overloaded and probes more patiently.",
        ),
        ("incarnation", "incarnation", "This node's incarnation number."),
        ("generation", "generation", "This node's generation (starts so far)."),
    ):
        value = _number(status.get(key))
        if value is not None:
            fam.add(family, "gauge", help, [], value)
    fam.add(
        "leaving",
        "gauge",
        "1 while this node is leaving the cluster.",
        [],
        1 if status.get("leaving") else 0,
    )
    gauges = status.get("gauges")
    if isinstance(gauges, Mapping):
        for key, raw in sorted(gauges.items()):
            value = _number(raw)
            if value is None:
                continue
            family, help = GAUGES.get(str(key), (f"{key}", "A gauge without a description."))
            fam.add(family, "gauge", help, [], value)
    counters = status.get("counters")
    if isinstance(counters, Mapping):
        for name, raw in sorted(counters.items()):
            value = _number(raw)
            if value is None:
                continue
            _add_counter(fam, str(name), value)
    return fam.text()


_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _add_counter(fam: _Families, name: str, value: float) -> None:
    for rule in RULES:
        m = rule.pattern.fullmatch(name)
        if m is None:
            continue
        labels = [*rule.labels, *((k, v) for k, v in m.groupdict().items() if v is not None)]
        fam.add(rule.family, "counter", rule.help, labels, value)
        return
    fam.add(OTHER[0], "counter", OTHER[1], [("name", name)], value)


# --- HTTP ----------------------------------------------------------------------------

MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0
MAX_HTTP_CONNECTIONS = 16


class MetricsBindError(Exception):
    """The metrics address cannot be bound (fatal at start)."""


def open_metrics_socket(addr: tuple[str, int]) -> socket.socket:
    """A listening TCP socket for the metrics endpoint."""
    host, port = addr
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT after restart
        sock.bind((host, port))
        sock.listen(16)
    except OSError as e:
        sock.close()
        raise MetricsBindError(
            f"cannot bind the metrics address {host}:{port}: {e.strerror or e}"
        ) from None
    sock.setblocking(False)
    return sock


def http_response(
    status: str,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    head_only: bool = False,
) -> bytes:
    header = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n"
        "Cache-Control: no-store\r\n\r\n"
    )
    return header.encode() + (b"" if head_only else body)


def parse_request_line(head: bytes) -> tuple[str, str] | None:
    """(method, path without query) from the request head, None if malformed."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return None
    return parts[0], parts[1].split("?", 1)[0]


async def serve_http(
    sock: socket.socket,
    snapshot: Callable[[], Awaitable[Mapping[str, Any]]],
    *,
    task_status: trio.TaskStatus[None] | None = None,
) -> None:
    """Answer ``GET /metrics`` on ``sock`` with :func:`render` of ``snapshot()``.

    HTTP/1.1 with one request per connection (``Connection: close``). At most
    :data:`MAX_HTTP_CONNECTIONS` at once, each bounded in size and time, so a
    stuck scraper cannot pile up tasks.
    """
    import trio

    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    limit = trio.Semaphore(MAX_HTTP_CONNECTIONS)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(REQUEST_TIMEOUT_S):
                response = await _answer(stream, snapshot)
                if response:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await stream.send_all(response)

    async def guarded(stream: trio.SocketStream) -> None:
        try:
            await handle(stream)
        except Exception:
            # One bad scrape must not take the daemon down (like an API connection).
            log.exception("metrics request failed")
        finally:
            limit.release()

    async with listener, trio.open_nursery() as nursery:
        if task_status is not None:
            task_status.started()
        while True:
            try:
                stream = await listener.accept()
            except OSError:
                await trio.sleep(0.1)  # out of descriptors: try again shortly
                continue
            try:
                limit.acquire_nowait()
            except trio.WouldBlock:
                await stream.aclose()
                continue
            nursery.start_soon(guarded, stream)


async def _answer(stream: Any, snapshot: Callable[[], Awaitable[Mapping[str, Any]]]) -> bytes:
    import trio

    head = b""
    while b"\r\n\r\n" not in head:
        try:
            chunk = await stream.receive_some(4096)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""
        if not chunk:
            return b""
        head += chunk
        if len(head) > MAX_REQUEST_BYTES:
            return http_response("431 Request Header Fields Too Large", b"request too large\n")
    request = parse_request_line(head)
    if request is None:
        return http_response("400 Bad Request", b"bad request\n")
    method, path = request
    if method not in ("GET", "HEAD"):
        return http_response("405 Method Not Allowed", b"only GET\n")
    if path not in ("/metrics", "/"):
        return http_response("404 Not Found", b"see /metrics\n", head_only=method == "HEAD")
    try:
        body = render(await snapshot()).encode()
    except Exception as e:  # shutting down (the runner finished), or a bug
        return http_response(
            "503 Service Unavailable", f"{e}\n".encode(), head_only=method == "HEAD"
        )
    return http_response("200 OK", body, CONTENT_TYPE, head_only=method == "HEAD")
