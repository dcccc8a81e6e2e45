"""Which addresses this node may advertise, and what a join name stands for.

A node's advertise address is what every peer will send its probes, gossip
and streams to, and what a peer checks an ``Alive`` against: an address no
one can answer from is worse than no address, because the node then looks
alive in its own eyes and is refuted, suspected and dropped by everyone
else. So it is checked before the daemon starts, the way memberlist refuses
an advertise address it cannot use and Consul checks ``advertise_addr``:

* never multicast, broadcast (the limited broadcast address, or the directed
  broadcast address of one of this host's IPv4 networks) or unspecified:
  no single node answers from those;
* an address of this host (one it can bind), unless the operator says a NAT
  or port forward maps it to this host (``advertise_nat = true``,
  ``--advertise-nat``): a typo or a copied config then fails at start with
  the reason, not later as a node nobody can reach.

Join names are resolved once at start (the core speaks addresses, never
names, and must not block on DNS). A name that stands for several seeds
(a round-robin record, a host with IPv4 and IPv6) gives every one of its
addresses, in the resolver's order with our socket's family first, up to
:data:`MAX_ADDRS_PER_NAME`: the core contacts them all, so one dead address
behind the name no longer makes the join fail.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Any

from peerd.shell.logs import Logger
from peerd.wire.messages import Addr

MAX_ADDRS_PER_NAME = 16
LIMITED_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_SIOCGIFBRDADDR = 0x8919  # Linux: an interface's IPv4 broadcast address

Resolver = Callable[..., list[tuple[Any, ...]]]
IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def never_advertised(ip: IP) -> str | None:
    """Why ``ip`` can never be a node's address, or None (no host lookups)."""
    if ip.is_unspecified:
        return f"{ip} is unspecified; give the address peers should use"
    if ip.is_multicast:
        return f"{ip} is a multicast address; give this node's own (unicast) address"
    if ip == LIMITED_BROADCAST:
        return f"{ip} is the broadcast address; give this node's own (unicast) address"
    return None


def local_broadcasts() -> set[ipaddress.IPv4Address]:
    """The directed broadcast addresses of this host's IPv4 interfaces (best
    effort: an interface whose address cannot be read is skipped)."""
    out: set[ipaddress.IPv4Address] = set()
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return out
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            request = struct.pack("256s", name.encode()[:15])
            with contextlib.suppress(OSError):
                reply = fcntl.ioctl(s.fileno(), _SIOCGIFBRDADDR, request)
                ip = ipaddress.IPv4Address(reply[20:24])
                if not ip.is_unspecified:
                    out.add(ip)
    return out


def is_host_address(host: str) -> bool:
    """Whether this host can bind ``host`` (one of its own addresses)."""
    ip = ipaddress.ip_address(host)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
    except OSError:
        return False
    return True


def advertise_problem(addr: Addr, *, nat: bool) -> str | None:
    """Why this node must not advertise ``addr``, or None."""
    ip = ipaddress.ip_address(addr[0].split("%", 1)[0])
    problem = never_advertised(ip)
    if problem is not None:
        return problem
    if isinstance(ip, ipaddress.IPv4Address) and ip in local_broadcasts():
        return f"{ip} is the broadcast address of a network of this host"
    if not nat and not is_host_address(addr[0]):
        return (
            f"{ip} is not an address of this host, so peers would send to someone "
            "else; if a NAT or port forward maps it to this host, set "
            "advertise_nat = true (or --advertise-nat)"
        )
    return None


def resolve_join(
    hosts: Iterable[tuple[str, int]],
    family: socket.AddressFamily,
    logger: Logger,
    resolver: Resolver | None = None,
) -> list[Addr]:
    """Join targets as IP literals: each name gives every address it resolves
    to (our family first, then the resolver's order; at most
    :data:`MAX_ADDRS_PER_NAME`), without duplicates."""
    resolve = resolver if resolver is not None else socket.getaddrinfo
    out: list[Addr] = []
    for host, port in hosts:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            if (host, port) not in out:
                out.append((host, port))
            continue
        try:
            infos = resolve(host, port, type=socket.SOCK_DGRAM)
        except (OSError, UnicodeError) as e:
            logger.warning("cannot resolve join address; skipped", host=host, error=str(e))
            continue
        # Prefer our own family (a v4 socket cannot send to a v6 peer); the
        # sort is stable, so the resolver's order stays within each family.
        infos = sorted(infos, key=lambda i: i[0] != family)
        addrs = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if len(addrs) > MAX_ADDRS_PER_NAME:
            logger.warning(
                "join name resolves to many addresses; using the first ones",
                host=host,
                resolved=len(addrs),
                used=MAX_ADDRS_PER_NAME,
            )
            addrs = addrs[:MAX_ADDRS_PER_NAME]
        out.extend(a for a in ((ip, port) for ip in addrs) if a not in out)
    return out
