"""UDP endpoint on real loopback sockets: sealing, drops, closed-port hints."""

from __future__ import annotations

import socket

import pytest
import trio

from peerd.core.events import PacketIn, Unreachable
from peerd.shell.udp import (
    BindError,
    UdpEndpoint,
    normalize_addr,
    open_udp_socket,
    sockaddr_for,
)
from tests.shell.conftest import Net, closed_udp_port, needs_ipv6

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))


def endpoint(host: str, net: Net, max_datagram: int = 2048) -> UdpEndpoint:
    return UdpEndpoint(
        open_udp_socket((host, 0)),
        sealer=net.sealer,
        opener=net.opener,
        inputs=net.send,
        counters=net.counters,
        log=net.log,
        max_datagram=max_datagram,
    )


async def next_input(ep: UdpEndpoint, net: Net) -> object:
    """Read the socket until the endpoint produced an input (bounded)."""
    with trio.fail_after(5):
        while True:
            try:
                return net.receive.receive_nowait()
            except trio.WouldBlock:
                await trio.lowlevel.wait_readable(ep.sock)
                ep.receive_ready()


@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("::1", marks=needs_ipv6)])
async def test_round_trip(host: str) -> None:
    na, nb = Net(b"A" * 16, [KEY_A]), Net(b"B" * 16, [KEY_A])
    a, b = endpoint(host, na), endpoint(host, nb)
    try:
        a.send(b.local_addr, b"hello")
        assert await next_input(b, nb) == PacketIn(a.local_addr, b"hello")
        assert na.counters["udp_tx"] == 1
        assert nb.counters["udp_rx"] == 1
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("::1", marks=needs_ipv6)])
async def test_closed_port_yields_unreachable(host: str) -> None:
    net = Net(b"A" * 16)
    a = endpoint(host, net)
    port = closed_udp_port(host)
    try:
        a.send((host, port), b"anyone?")
        assert await next_input(a, net) == Unreachable((host, port))
        assert net.counters["udp_unreachable"] == 1
    finally:
        a.close()


async def test_unreachable_reported_through_the_receive_loop() -> None:
    net = Net(b"A" * 16)
    a = endpoint("127.0.0.1", net)
    port = closed_udp_port()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.run)
            a.send(("127.0.0.1", port), b"x")
            with trio.fail_after(5):
                assert await net.receive.receive() == Unreachable(("127.0.0.1", port))
            nursery.cancel_scope.cancel()
    finally:
        a.close()


async def test_refusal_reported_on_send_does_not_lose_the_next_datagram() -> None:
    # With IP_RECVERR the refusal of datagram 1 is reported by the *next*
    # sendto, which then sends nothing: the endpoint must retry it.
    na, nb = Net(b"A" * 16), Net(b"B" * 16)
    a, b = endpoint("127.0.0.1", na), endpoint("127.0.0.1", nb)
    port = closed_udp_port()
    try:
        a.send(("127.0.0.1", port), b"lost")
        await trio.lowlevel.wait_readable(a.sock)  # the ICMP error is queued
        a.send(b.local_addr, b"second")
        assert await next_input(b, nb) == PacketIn(a.local_addr, b"second")
        assert await next_input(a, na) == Unreachable(("127.0.0.1", port))
    finally:
        a.close()
        b.close()


async def test_garbage_oversized_and_wrong_key_are_counted_drops() -> None:
    nb = Net(b"B" * 16, [KEY_A])
    b = endpoint("127.0.0.1", nb, max_datagram=1000)
    other = Net(b"C" * 16, [KEY_B])
    good = Net(b"A" * 16, [KEY_A])
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind(("127.0.0.1", 0))
    try:
        for _ in range(20):
            raw.sendto(b"\x07garbage", b.local_addr)
        raw.sendto(good.sealer.seal(b"x" * 1200), b.local_addr)  # over 1000 bytes
        raw.sendto(other.sealer.seal(b"wrong key"), b.local_addr)
        raw.sendto(b"", b.local_addr)
        raw.sendto(good.sealer.seal(b"fine"), b.local_addr)
        assert await next_input(b, nb) == PacketIn(normalize_addr(raw.getsockname()), b"fine")
        assert nb.counters["udp_drop_seal_malformed"] == 21
        assert nb.counters["udp_drop_oversize"] == 1
        assert nb.counters["udp_drop_seal_unknown_key"] == 1
        assert nb.counters["udp_rx"] == 1
        # Rate limited: a flood is a few lines, never a traceback per packet.
        log = nb.out.getvalue()
        assert log.count("datagram rejected") <= 6
        assert "Traceback" not in log
    finally:
        raw.close()
        b.close()


async def test_full_input_queue_sheds_load() -> None:
    na, nb = Net(b"A" * 16), Net(b"B" * 16, queue=1)
    a, b = endpoint("127.0.0.1", na), endpoint("127.0.0.1", nb)
    try:
        for i in range(3):
            a.send(b.local_addr, b"%d" % i)
        with trio.fail_after(5):
            while nb.counters["udp_rx"] < 3:
                await trio.lowlevel.wait_readable(b.sock)
                b.receive_ready()
        assert nb.counters["udp_drop_backlog"] == 2
        assert nb.receive.receive_nowait() == PacketIn(a.local_addr, b"0")
    finally:
        a.close()
        b.close()


def test_address_in_use_fails_at_once() -> None:
    first = open_udp_socket(("127.0.0.1", 0))
    try:
        with pytest.raises(BindError, match="already in use"):
            open_udp_socket(("127.0.0.1", first.getsockname()[1]))
    finally:
        first.close()


def test_address_not_local_fails_clearly() -> None:
    with pytest.raises(BindError, match="not available"):
        open_udp_socket(("192.0.2.1", 0))


async def test_family_mismatch_is_a_counted_drop() -> None:
    net = Net(b"A" * 16)
    a = endpoint("127.0.0.1", net)
    try:
        a.send(("::1", 7950), b"x")
        assert net.counters["udp_drop_send_family"] == 1
    finally:
        a.close()


@needs_ipv6
async def test_dual_stack_bind_sees_ipv4_peers_as_ipv4() -> None:
    na, nb = Net(b"A" * 16), Net(b"B" * 16)
    b = endpoint("::", nb)
    a = endpoint("127.0.0.1", na)
    try:
        a.send(("127.0.0.1", b.local_addr[1]), b"v4")
        assert await next_input(b, nb) == PacketIn(a.local_addr, b"v4")
        b.send(a.local_addr, b"back")
        assert await next_input(a, na) == PacketIn(("127.0.0.1", b.local_addr[1]), b"back")
    finally:
        a.close()
        b.close()


def test_address_helpers() -> None:
    assert normalize_addr(("::ffff:10.0.0.1", 5, 0, 0)) == ("10.0.0.1", 5)
    assert normalize_addr(("::1", 5, 0, 0)) == ("::1", 5)
    assert normalize_addr(("10.0.0.1", 5)) == ("10.0.0.1", 5)
    assert sockaddr_for("10.0.0.1", 5, socket.AF_INET6) == ("::ffff:10.0.0.1", 5, 0, 0)
    assert sockaddr_for("::1", 5, socket.AF_INET) is None
    assert sockaddr_for("not-an-ip", 5, socket.AF_INET) is None
