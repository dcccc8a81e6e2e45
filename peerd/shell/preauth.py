"""What an unauthenticated TCP connection may cost the daemon.

Everything that arrives on the mesh/TCP port is sealed (:mod:`peerd.wire.seal`),
but a sealed frame can only be checked once all of it is in memory: the AEAD
tag is at its end. So whatever a connection sends before its first frame
opens is buffered on the word of a sender nobody has verified yet. Left at
the transport's frame limit (8 MiB, what a large push-pull needs), 64 such
connections made a daemon hold half a gigabyte for a stranger.

The rule here is the one the Linux kernel applies to half-open connections
(a SYN backlog per listener, SYN cookies when it is full) and that
WireGuard applies to handshakes (a cookie before any expensive work): state
kept for a peer that has proven nothing must be small, bounded in total, and
short-lived. Concretely, until its first sealed frame opens, a connection

* may announce a frame of at most ``preauth_max_frame`` bytes (a few KiB:
  the hellos of watch links, peer links and streams, and the small
  push-pull requests of small clusters fit); a longer announced length is
  refused at once, before a byte of its body is read;
* reserves the bytes it announced from one budget shared by all of them
  (``preauth_budget_bytes``); when the budget is spent, it is refused;
* must deliver that frame within ``hello_timeout_s`` of being accepted;
* holds one of at most ``max_preauth_per_source`` slots of its source
  address, so one host (or a few) cannot take all of the listener's
  ``max_connections`` slots and lock out the others: the kernel's SYN
  backlog is global, which is exactly why a flood from one address fills it.

A request larger than ``preauth_max_frame`` (a push-pull of a big cluster)
first proves its sender with a *stream hello*: a small sealed frame whose
payload is :data:`STREAM_HELLO`. Its sender is then authenticated and its
next frame (from the same sender) may use the transport's full frame size.
The hello rides in the same write as the request, so it costs no round trip.

Each refusal is a counted drop with its own reason (``preauth_oversize``,
``preauth_budget``, ``preauth_timeout``, ``per_source_cap``), logged through
the rate-limited network log.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The peer-link magic (peerd.shell.links.MAGIC) and "S": a CBOR push-pull
# payload cannot start with 0xff, so a stream hello is never a request.
STREAM_HELLO = b"\xffPDL1S"


@dataclass(slots=True)
class PreauthGate:
    """Slots per source address and the shared byte budget of the
    connections whose first frame has not opened yet.

    Only counts: the caller (:class:`peerd.shell.tcp.TcpEndpoint`) enters and
    leaves, reserves and releases, in pairs, and turns a False into a
    counted drop.
    """

    max_per_source: int
    budget_bytes: int
    by_source: dict[str, int] = field(default_factory=dict)
    reserved: int = 0

    @property
    def connections(self) -> int:
        return sum(self.by_source.values())

    def enter(self, host: str) -> bool:
        """Take a slot of ``host``; False when it holds all of its own."""
        held = self.by_source.get(host, 0)
        if held >= self.max_per_source:
            return False
        self.by_source[host] = held + 1
        return True

    def leave(self, host: str) -> None:
        held = self.by_source.get(host, 0) - 1
        if held > 0:
            self.by_source[host] = held
        else:
            self.by_source.pop(host, None)

    def reserve(self, n: int) -> bool:
        """Take ``n`` bytes of the budget; False if they are not left."""
        if self.reserved + n > self.budget_bytes:
            return False
        self.reserved += n
        return True

    def release(self, n: int) -> None:
        self.reserved = max(0, self.reserved - n)
