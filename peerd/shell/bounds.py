"""The sane range of every numeric setting, in one table.

A type check lets through values that are well-formed and still ruin a
node: ``probe_interval_s = 1e-6`` pins a core to one CPU, ``1e300``
disables failure detection, ``[links] idle_s = 1e-9`` spins the reaper,
``mailbox_bytes = 1e15`` is no bound at all, ``dead_reclaim_s = 0`` forgets
the dead at once so they come back as ghosts. PostgreSQL's GUCs (each with a
min and max in one table, the error naming both) and systemd's checked unit
settings are the model: every numeric setting has a documented range, the
file and the flags are checked against it before the daemon starts (and on
reload, and by ``--check-config``), and a value outside is refused with the
setting, the value and the range in the message (exit 2).

The ranges are deliberately wide (they hold every preset and every
deployment we know of, on a LAN, a WAN or one machine) and exist to catch
typos and hostile or absurd files, not to tune. Relations between settings
(``probe_timeout_s <= probe_interval_s``, ``max_direct_links <= max_links``,
``drain_timeout_s < write_timeout_s``) are checked where the table they
belong to is built (:mod:`peerd.shell.settings`). systemd/peerd.toml states
each range next to its setting; a test holds the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass

from peerd.api.protocol import MAX_MESSAGE_BYTES

DAY_S = 86400.0
# A mailbox must hold one message of the largest size, with its envelope.
MIN_MAILBOX_BYTES = MAX_MESSAGE_BYTES + 4096


def number(value: float) -> str:
    """A value as a person would write it in the file (262144, 0.05, 1e+300)."""
    if float(value).is_integer() and abs(value) < 1e16:
        return str(int(value))
    return f"{value:g}"


@dataclass(frozen=True, slots=True)
class Bound:
    """``low <= value <= high``; with ``off``, 0 is accepted too (it turns
    the feature off, and anything between 0 and ``low`` would spin)."""

    low: float
    high: float
    off: bool = False

    def allows(self, value: float) -> bool:
        return (self.off and value == 0) or self.low <= value <= self.high

    def text(self) -> str:
        span = f"{number(self.low)} to {number(self.high)}"
        return f"0 (off) or {span}" if self.off else span


BOUNDS: dict[str, Bound] = {
    # [swim] (membership; registry_flush_s is the registry's)
    "swim.probe_interval_s": Bound(0.05, 60.0),
    "swim.probe_timeout_s": Bound(0.01, 60.0),
    "swim.indirect_checks": Bound(0, 16),
    "swim.suspicion_mult": Bound(1.0, 50.0),
    "swim.suspicion_max_timeout_mult": Bound(1.0, 100.0),
    "swim.retransmit_mult": Bound(1, 20),
    "swim.gossip_interval_s": Bound(0.01, 10.0),
    "swim.gossip_fanout": Bound(1, 32),
    "swim.gossip_to_dead_s": Bound(0.0, DAY_S),
    "swim.push_pull_interval_s": Bound(1.0, DAY_S, off=True),
    "swim.max_concurrent_syncs": Bound(1, 64),
    "swim.max_concurrent_reconnects": Bound(1, 64),
    "swim.awareness_max": Bound(1, 64),
    "swim.reconnect_interval_s": Bound(0.1, 3600.0),
    "swim.dead_reclaim_s": Bound(60.0, 30 * DAY_S),
    "swim.max_packet_bytes": Bound(512, 65000),
    "swim.refused_suspicion_timeout_s": Bound(0.05, 60.0),
    "swim.watch_links": Bound(0, 16),
    "swim.registry_flush_s": Bound(0.0, 10.0),
    "swim.leave_propagate_s": Bound(0.0, 60.0),
    "swim.max_tags": Bound(0, 256),
    "swim.max_tags_bytes": Bound(0, 8192),
    "swim.tree_batch_s": Bound(0.0, 1.0),
    "swim.tree_batch_bytes": Bound(1024, 49152),
    "swim.tree_relay_after_s": Bound(0.01, 60.0),
    "swim.tree_desk_hold_s": Bound(0.0, 10.0),
    # [links]
    "links.max_links": Bound(1, 16384),
    "links.max_direct_links": Bound(1, 16384),
    "links.idle_s": Bound(1.0, DAY_S),
    "links.connect_timeout_s": Bound(0.1, 300.0),
    "links.handshake_timeout_s": Bound(0.1, 300.0),
    "links.write_timeout_s": Bound(0.5, 600.0),
    "links.drain_timeout_s": Bound(0.05, 600.0),
    # an unauthenticated connection's deadline: long enough for a slow
    # network, short enough that a host cannot hold its slots (shell/preauth)
    "links.hello_timeout_s": Bound(0.5, 30.0),
    # [messages]
    "messages.send_timeout_s": Bound(0.1, 3600.0),
    "messages.mailbox_messages": Bound(1, 1 << 20),
    "messages.mailbox_bytes": Bound(MIN_MAILBOX_BYTES, 256 << 20),
    "messages.mailbox_total_bytes": Bound(MIN_MAILBOX_BYTES, 64 << 30),
}


def out_of_range(key: str, value: float) -> str | None:
    """Why ``value`` is refused for ``key`` (``swim.probe_interval_s``), or
    None. A key without a bound (there is none: a test holds the table
    complete) must still not be negative."""
    bound = BOUNDS.get(key)
    if bound is None:
        return f"must not be negative, got {number(value)}" if value < 0 else None
    if bound.allows(value):
        return None
    return f"{number(value)} is out of range: must be {bound.text()}"
