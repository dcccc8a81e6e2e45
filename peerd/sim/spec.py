"""The scenario language as data: what a scenario file can say, once parsed.

Theory of operation. A scenario is a frozen value (cluster size, seed,
network, SWIM config, faults, workloads and expectations) that the simulator
only reads; :mod:`peerd.sim.scenario` makes it from TOML and is the only
place that decides what a valid file is. The key sets and the table of checks
with the keys each needs live here, beside the values they describe, so the
parser needs nothing of the simulator that runs a scenario.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from peerd.core import config as cfgmod

FAULT_KINDS = (
    "crash",
    "pause",
    "slow",
    "restart",
    "leave",
    "join",
    "partition",
    "heal",
    "loss",
    "block",
    "register",
)

# Keys every fault accepts, and the extra keys of each kind.
_COMMON_FAULT_KEYS: set[str] = {"at_s", "kind", "repeat", "every_s", "over_s", "note"}
_FAULT_KEYS: dict[str, set[str]] = {
    "crash": {"nodes", "icmp"},
    "pause": {"nodes", "duration_s"},
    "slow": {"nodes", "duration_s", "delay_ms"},
    "restart": {"nodes", "down_s"},
    "leave": {"nodes"},
    "join": {"nodes"},
    "partition": {"groups", "duration_s"},
    "heal": set(),
    "loss": {"nodes", "loss", "duration_s"},
    "block": {"from", "to", "symmetric", "duration_s"},
    "register": {"nodes", "names", "prefix"},
}
_ALL_FAULT_KEYS = set().union(*_FAULT_KEYS.values())
_REQUIRED: dict[str, tuple[str, ...]] = {
    "crash": ("nodes",),
    "pause": ("nodes", "duration_s"),
    "slow": ("nodes", "delay_ms"),
    "restart": ("nodes",),
    "leave": ("nodes",),
    "join": ("nodes",),
    "partition": ("groups",),
    "heal": (),
    "loss": ("loss",),
    "block": ("from", "to"),
    "register": ("nodes", "names"),
}

_TOP_KEYS = {
    "name",
    "description",
    "nodes",
    "seed",
    "duration_s",
    "preset",
    "start_nodes",
    "seeds",
    "sample_s",
    "network",
    "config",
    "fault",
    "expect",
    "registry",
    "mesh",
    "names",
}
_MESH_KEYS = {
    "enabled",
    "broadcast_every_s",
    "broadcast_from_s",
    "broadcast_until_s",
    "payload_bytes",
    "settle_s",
}
_REGISTRY_KEYS = {
    "names_per_node",
    "groups",
    "joins_per_node",
    "churn_per_node_s",
    "churn_from_s",
    "churn_until_s",
    "scope",
    "preload",
    "start_s",
    "over_s",
    "on_start_s",
}
_NAMES_KEYS = {
    "names_per_node",
    "send_every_s",
    "send_from_s",
    "send_until_s",
    "payload_bytes",
    "reply",
    "settle_s",
}
_NETWORK_KEYS = {
    "latency_ms",
    "link_ms",
    "loss",
    "duplicate",
    "reorder",
    "reorder_ms",
    "mtu",
    "seal",
    "stream_timeout_s",
}
_EXPECT_KEYS = {
    "check",
    "after_s",
    "until_s",
    "within_s",
    "max",
    "min",
    "max_ms",
    "nodes",
    "note",
}


class ScenarioError(Exception):
    """A bad scenario file: ``line`` (1-based, 0 if unknown) and ``reason``."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


# A selection of nodes: "all", a fraction of N (float in (0, 1]), a count
# (int >= 0) or explicit indices.
Selection = str | float | int | tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Latency:
    min_ms: float = 1.0
    max_ms: float = 10.0
    dist: str = "uniform"  # uniform | exponential (min + exp with mean (max-min)/3, capped)


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    latency: Latency = Latency()
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0  # probability a datagram is held back by reorder_ms extra
    reorder_ms: float = 20.0
    mtu: int = 1472  # UDP payload bytes (envelope included) that fit a 1500-byte link
    seal: bool = False  # really seal/open every datagram (ChaCha20-Poly1305)
    stream_timeout_s: float = 15.0
    # Each pair of hosts gets a fixed extra delay in [0, link_ms] (near and far
    # peers), on top of the per-datagram latency distribution.
    link_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Fault:
    index: int  # position in the file (derives the fault's RNG)
    line: int
    at_s: float
    kind: str
    nodes: Selection | None = None
    duration_s: float | None = None
    groups: tuple[float, ...] = ()
    loss: float = 0.0
    delay_ms: float = 0.0
    down_s: float = 1.0
    icmp: bool = True
    src: Selection | None = None
    dst: Selection | None = None
    symmetric: bool = False
    repeat: int = 1
    every_s: float = 0.0
    over_s: float = 0.0
    names: int = 0  # register: how many names each selected node claims
    prefix: str = "shared"  # register: the names are "<prefix>-<k>"


@dataclass(frozen=True, slots=True)
class RegistrySpec:
    """A registry workload (``[registry]``): every node's processes register
    ``names_per_node`` unique names and join ``joins_per_node`` of ``groups``
    groups, each entry held by its own process (API connection); then, at
    ``churn_per_node_s`` per running node, a random process exits (its entry
    goes) and a new one registers a fresh name (or rejoins the same group)."""

    names_per_node: int = 0
    groups: int = 0
    joins_per_node: int = 0
    churn_per_node_s: float = 0.0
    churn_from_s: float = 0.0
    churn_until_s: float | None = None  # default: the end of the run
    scope: str = "default"
    # The nodes running at t=0 start with the workload's entries already
    # replicated everywhere (a converged registry, shared copy-on-write like
    # the member tables); false: each registers them at start_s, spread over over_s.
    preload: bool = True
    start_s: float = 0.0
    over_s: float = 0.0
    # Nodes that start during the run (a join, a restart) register their
    # workload this long after their daemon starts; None: they register nothing.
    on_start_s: float | None = None


@dataclass(frozen=True, slots=True)
class MeshSpec:
    """The partial mesh (``[mesh]``): on in every scenario unless ``enabled``
    is false; a broadcast of ``payload_bytes`` from a random running node
    every ``broadcast_every_s`` (0: none), each measured ``settle_s`` later."""

    enabled: bool = True
    broadcast_every_s: float = 5.0
    broadcast_from_s: float = 5.0
    broadcast_until_s: float | None = None
    payload_bytes: int = 64
    settle_s: float = 3.0


@dataclass(frozen=True, slots=True)
class NamesSpec:
    """A names workload (``[names]``): every ``send_every_s`` (for the whole
    cluster, whatever its size) a random live process sends a message of
    ``payload_bytes`` to a random registered name (``names_per_node`` names
    of its own per node; 0: the [registry] workload's unique names), asking
    for a reply if ``reply``; each message is judged ``settle_s`` (>= 1) after
    it was sent."""

    names_per_node: int = 0
    send_every_s: float = 1.0
    send_from_s: float = 0.0
    send_until_s: float | None = None  # default: the end of the run minus settle_s
    payload_bytes: int = 64
    reply: bool = False
    settle_s: float = 5.0


@dataclass(frozen=True, slots=True)
class Expect:
    index: int
    line: int
    check: str
    after_s: float = 0.0
    within_s: float | None = None
    max: float | None = None
    min: float | None = None
    nodes: Selection | None = None
    max_ms: float | None = None
    # checks of what was sent (broadcasts, messages to names): only what was
    # sent before until_s counts (None: to the end of the run)
    until_s: float | None = None


@dataclass(frozen=True, slots=True)
class Scenario:
    path: str
    name: str
    description: str
    nodes: int
    seed: int
    duration_s: float
    preset: str
    start_nodes: Selection
    seeds: tuple[int, ...]
    sample_s: float
    network: NetworkSpec
    config: cfgmod.SwimConfig
    faults: tuple[Fault, ...] = ()
    expects: tuple[Expect, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    registry: RegistrySpec | None = None
    mesh: MeshSpec = MeshSpec()
    names: NamesSpec | None = None

    def with_overrides(
        self, *, nodes: int | None = None, seed: int | None = None, duration_s: float | None = None
    ) -> Scenario:
        changes: dict[str, Any] = {}
        if nodes is not None:
            if nodes < 1:
                raise ScenarioError(self.path, 0, "--nodes must be at least 1")
            changes["nodes"] = nodes
            changes["seeds"] = tuple(s for s in self.seeds if s < nodes) or (0,)
        if seed is not None:
            changes["seed"] = seed
        if duration_s is not None:
            if duration_s <= 0:
                raise ScenarioError(self.path, 0, "--duration must be positive")
            changes["duration_s"] = duration_s
        return dataclasses.replace(self, **changes)

    def start_count(self) -> int:
        """How many nodes run (preloaded, converged) at t=0."""
        sel = self.start_nodes
        if sel == "all":
            return self.nodes
        if isinstance(sel, float):
            return max(1, min(self.nodes, round(sel * self.nodes)))
        if isinstance(sel, int):
            return max(1, min(self.nodes, sel))
        raise AssertionError("start_nodes is validated at load")


# The checks that judge what was sent in a window [after_s, until_s).
WINDOWED_CHECKS = frozenset(
    {
        "broadcast_reliability",
        "broadcast_redundancy",
        "broadcast_hops",
        "name_delivery",
        "name_latency",
        "lost_messages",
    }
)

# The checks a scenario can state, with the keys each needs (their functions
# live in peerd.sim.checks, which reads the run's record).
CHECK_NEEDS: dict[str, tuple[str, ...]] = {
    "converged": ("within_s",),
    "no_false_positives": (),
    "false_suspicions": ("max",),
    "detected": ("within_s",),
    "detected_first": ("within_s",),
    "suspected": (),
    "refuted": ("within_s",),
    "no_cascade": (),
    "left": ("within_s",),
    "msgs_per_node_s": ("max",),
    "bytes_per_node_s": ("max",),
    "registry_converged": ("within_s",),
    "lost_live_entries": ("within_s",),
    "stale_entries": ("within_s",),
    "duplicates_after_heal": ("within_s",),
    "max_links_per_node": (),
    "broadcast_reliability": (),
    "broadcast_redundancy": ("max",),
    "broadcast_hops": (),
    "name_delivery": (),
    "name_latency": ("max_ms",),
    "lost_messages": (),
}

_MESH_CHECKS = (
    "max_links_per_node",
    "broadcast_reliability",
    "broadcast_redundancy",
    "broadcast_hops",
)
_NAMES_CHECKS = ("name_delivery", "name_latency", "lost_messages")
_REGISTRY_CHECKS = (
    "registry_converged",
    "lost_live_entries",
    "stale_entries",
    "duplicates_after_heal",
)
