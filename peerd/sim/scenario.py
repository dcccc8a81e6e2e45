"""Scenario files: a TOML description of a simulated cluster, its faults and
what must hold (see scenarios/README.md for the schema with examples).

Parsing is strict: an unknown key, a wrong type or a value out of range is a
:class:`ScenarioError` naming the line and the reason, because a typo in a
fault (``duraton_s``) that silently did nothing would make a passing run
meaningless. The CLI turns it into exit status 2.

Node selections (``nodes``, ``from``, ``to``) are resolved at the time the
fault fires, by the world, with an RNG derived from the scenario seed and the
fault's position in the file, so the same file and seed pick the same nodes.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from pathlib import Path
from typing import Any, NoReturn

from peerd.core import config as cfgmod
from peerd.sim.spec import (  # re-exported: the scenario's data
    _ALL_FAULT_KEYS,
    _COMMON_FAULT_KEYS,
    _EXPECT_KEYS,
    _FAULT_KEYS,
    _MESH_CHECKS,
    _MESH_KEYS,
    _NAMES_CHECKS,
    _NAMES_KEYS,
    _NETWORK_KEYS,
    _REGISTRY_CHECKS,
    _REGISTRY_KEYS,
    _REQUIRED,
    _TOP_KEYS,
    CHECK_NEEDS,
    FAULT_KINDS,
    WINDOWED_CHECKS,
    Expect,
    Fault,
    Latency,
    MeshSpec,
    NamesSpec,
    NetworkSpec,
    RegistrySpec,
    Scenario,
    ScenarioError,
    Selection,
)

__all__ = [
    "CHECK_NEEDS",
    "Expect",
    "FAULT_KINDS",
    "Fault",
    "Latency",
    "MeshSpec",
    "NamesSpec",
    "NetworkSpec",
    "RegistrySpec",
    "Scenario",
    "ScenarioError",
    "Selection",
    "load",
    "loads",
]

# --- locating lines ----------------------------------------------------------------

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.-]+)\s*\]\]?")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")


class _Lines:
    """Maps (table, index, key) to the line where it is written."""

    def __init__(self, text: str) -> None:
        self.tables: dict[tuple[str, int], int] = {}
        self.keys: dict[tuple[str, int, str], int] = {}
        counts: dict[str, int] = {}
        table, index = "", 0
        for n, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0] if '"' not in raw else raw
            m = _HEADER.match(line)
            if m:
                table = m.group(2)
                if m.group(1) == "[[":
                    index = counts.get(table, 0)
                    counts[table] = index + 1
                else:
                    index = 0
                self.tables[(table, index)] = n
                continue
            k = _KEY.match(line)
            if k:
                self.keys.setdefault((table, index, k.group(1)), n)

    def of(self, table: str, index: int = 0, key: str | None = None) -> int:
        if key is not None and (table, index, key) in self.keys:
            return self.keys[(table, index, key)]
        return self.tables.get((table, index), 0)


# --- loading -----------------------------------------------------------------------


def load(path: str | Path) -> Scenario:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(str(p), 0, f"cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ScenarioError(str(p), 0, "not UTF-8 text") from exc
    return loads(text, str(p))


def loads(text: str, path: str = "<scenario>") -> Scenario:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"at line (\d+)", msg)
        raise ScenarioError(path, int(m.group(1)) if m else 0, f"TOML syntax: {msg}") from exc
    return _Parser(path, _Lines(text)).scenario(doc)


class _Parser:
    def __init__(self, path: str, lines: _Lines) -> None:
        self.path = path
        self.lines = lines

    def fail(
        self, reason: str, table: str = "", index: int = 0, key: str | None = None
    ) -> NoReturn:
        raise ScenarioError(self.path, self.lines.of(table, index, key), reason)

    # typed getters; ``where`` is (table, index) for line lookup
    def _num(
        self,
        d: dict[str, Any],
        key: str,
        where: tuple[str, int],
        *,
        default: float | None = None,
        lo: float | None = None,
        hi: float | None = None,
        lo_open: bool = False,
        required: bool = False,
    ) -> float | None:
        if key not in d:
            if required:
                self.fail(f"missing required key '{key}'", *where)
            return default
        v = d[key]
        if type(v) not in (int, float) or (isinstance(v, float) and not math.isfinite(v)):
            self.fail(f"'{key}' must be a number, got {v!r}", *where, key)
        v = float(v)
        if lo is not None and (v <= lo if lo_open else v < lo):
            self.fail(f"'{key}' must be {'>' if lo_open else '>='} {lo:g}, got {v:g}", *where, key)
        if hi is not None and v > hi:
            self.fail(f"'{key}' must be <= {hi:g}, got {v:g}", *where, key)
        return v

    def _num_or(
        self, d: dict[str, Any], key: str, where: tuple[str, int], default: float, **bounds: Any
    ) -> float:
        """:meth:`_num` with a default, so never None."""
        v = self._num(d, key, where, default=default, **bounds)
        assert v is not None
        return v

    def _bool(self, d: dict[str, Any], key: str, where: tuple[str, int], default: bool) -> bool:
        if key not in d:
            return default
        v = d[key]
        if type(v) is not bool:
            self.fail(f"'{key}' must be true or false, got {v!r}", *where, key)
        return bool(v)

    def _unknown(
        self, d: dict[str, Any], allowed: set[str], where: tuple[str, int], what: str
    ) -> None:
        every = (
            _ALL_FAULT_KEYS
            | _TOP_KEYS
            | _NETWORK_KEYS
            | _EXPECT_KEYS
            | _REGISTRY_KEYS
            | _MESH_KEYS
            | _NAMES_KEYS
        )
        for k in d:
            if k not in allowed:
                hint = _closest(k, allowed)
                if hint:
                    extra = f" (did you mean '{hint}'?)"
                elif k in every:
                    extra = f" ('{k}' is not used there)"
                else:
                    near = _closest(k, every)
                    extra = f" (did you mean '{near}'? it is not used there)" if near else ""
                self.fail(f"unknown key '{k}' in {what}{extra}", *where, k)

    def _selection(self, v: Any, where: tuple[str, int], key: str) -> Selection:
        if v == "all":
            return "all"
        if type(v) is int:
            if v < 0:
                self.fail(f"'{key}' count must be >= 0, got {v}", *where, key)
            return v
        if type(v) is float:
            if not 0.0 < v <= 1.0:
                self.fail(f"'{key}' fraction must be in (0, 1], got {v:g}", *where, key)
            return v
        if type(v) is list:
            if not v or any(type(x) is not int or x < 0 for x in v):
                self.fail(f"'{key}' list must hold node indices (integers >= 0)", *where, key)
            return tuple(v)
        self.fail(
            f"'{key}' must be a fraction (0.05), a count (5), a list of node indices "
            f'([0, 3]) or "all", got {v!r}',
            *where,
            key,
        )
        raise AssertionError

    def scenario(self, doc: dict[str, Any]) -> Scenario:
        top = ("", 0)
        self._unknown(doc, _TOP_KEYS, top, "the scenario")
        name = doc.get("name")
        if type(name) is not str or not name:
            self.fail("missing or empty 'name'", "", 0, "name")
        desc = doc.get("description", "")
        if type(desc) is not str:
            self.fail("'description' must be text", "", 0, "description")
        nodes_v = doc.get("nodes")
        if type(nodes_v) is not int or nodes_v < 1:
            self.fail(f"'nodes' must be an integer >= 1, got {nodes_v!r}", "", 0, "nodes")
        seed = doc.get("seed", 1)
        if type(seed) is not int or seed < 0:
            self.fail(f"'seed' must be an integer >= 0, got {seed!r}", "", 0, "seed")
        duration = self._num(doc, "duration_s", top, lo=0, lo_open=True, required=True)
        preset = doc.get("preset", "lan")
        if preset not in cfgmod.PRESETS:
            self.fail(
                f"'preset' must be one of {', '.join(cfgmod.PRESETS)}, got {preset!r}",
                "",
                0,
                "preset",
            )
        start = self._selection(doc.get("start_nodes", "all"), top, "start_nodes")
        if isinstance(start, tuple):
            self.fail("'start_nodes' must be a fraction, a count or \"all\"", "", 0, "start_nodes")
        seeds_v = doc.get("seeds", [0, 1, 2])
        if (
            type(seeds_v) is not list
            or not seeds_v
            or any(type(x) is not int or x < 0 for x in seeds_v)
        ):
            self.fail("'seeds' must be a non-empty list of node indices", "", 0, "seeds")
        seeds = tuple(s for s in seeds_v if s < nodes_v) or (0,)
        sample_s = self._num(doc, "sample_s", top, default=1.0, lo=0.01)
        network = self.network(doc.get("network", {}))
        config = self.config(preset, doc.get("config", {}))
        faults_v = doc.get("fault", [])
        if type(faults_v) is not list:
            self.fail("'fault' must be an array of tables: write [[fault]]", "", 0, "fault")
        faults = tuple(self.fault(i, f) for i, f in enumerate(faults_v))
        expects_v = doc.get("expect", [])
        if type(expects_v) is not list:
            self.fail("'expect' must be an array of tables: write [[expect]]", "", 0, "expect")
        expects = tuple(self.expect(i, e) for i, e in enumerate(expects_v))
        registry = self.registry(doc["registry"]) if "registry" in doc else None
        mesh = self.mesh(doc.get("mesh", {}))
        names = self.names(doc["names"], registry) if "names" in doc else None
        if names is None:
            for e in expects:
                if e.check in _NAMES_CHECKS:
                    self.fail(
                        f"check '{e.check}' needs a [names] workload", "expect", e.index, "check"
                    )
        if not mesh.enabled:
            for e in expects:
                if e.check in _MESH_CHECKS:
                    self.fail(
                        f"check '{e.check}' needs the mesh ([mesh] enabled = true)",
                        "expect",
                        e.index,
                        "check",
                    )
        assert duration is not None and sample_s is not None
        if registry is None:
            for e in expects:
                if e.check in _REGISTRY_CHECKS:
                    self.fail(
                        f"check '{e.check}' needs a [registry] workload", "expect", e.index, "check"
                    )
            for f in faults:
                if f.kind == "register":
                    self.fail(
                        "a 'register' fault needs a [registry] workload", "fault", f.index, "kind"
                    )
        return Scenario(
            self.path,
            name,
            desc,
            nodes_v,
            seed,
            duration,
            preset,
            start,
            seeds,
            sample_s,
            network,
            config,
            faults,
            expects,
            dict(doc.get("config", {})),
            registry,
            mesh,
            names,
        )

    def names(self, d: Any, registry: RegistrySpec | None) -> NamesSpec:
        where = ("names", 0)
        if type(d) is not dict:
            self.fail("'names' must be a table: write [names]", "", 0, "names")
        self._unknown(d, _NAMES_KEYS, where, "[names]")
        per_node = d.get("names_per_node", 0)
        if type(per_node) is not int or per_node < 0:
            self.fail(
                f"'names_per_node' must be an integer >= 0, got {per_node!r}",
                *where,
                "names_per_node",
            )
        if not per_node and (registry is None or not registry.names_per_node):
            self.fail(
                "[names] needs names: 'names_per_node' here, or a [registry] workload "
                "with names_per_node",
                *where,
                "names_per_node",
            )
        every = self._num(d, "send_every_s", where, default=1.0, lo=0, lo_open=True)
        start = self._num(d, "send_from_s", where, default=0.0, lo=0)
        until = self._num(d, "send_until_s", where, lo=0)
        size = d.get("payload_bytes", 64)
        if type(size) is not int or not 0 <= size <= 65536:
            self.fail(
                f"'payload_bytes' must be an integer in 0..65536, got {size!r}",
                *where,
                "payload_bytes",
            )
        reply = self._bool(d, "reply", where, False)
        settle = self._num(d, "settle_s", where, default=5.0, lo=1.0)
        assert every is not None and start is not None and settle is not None
        return NamesSpec(per_node, every, start, until, size, reply, settle)

    def mesh(self, d: Any) -> MeshSpec:
        where = ("mesh", 0)
        if type(d) is not dict:
            self.fail("'mesh' must be a table: write [mesh]", "", 0, "mesh")
        self._unknown(d, _MESH_KEYS, where, "[mesh]")
        enabled = self._bool(d, "enabled", where, True)
        every = self._num(d, "broadcast_every_s", where, default=5.0, lo=0)
        start = self._num(d, "broadcast_from_s", where, default=5.0, lo=0)
        until = self._num(d, "broadcast_until_s", where, lo=0)
        settle = self._num(d, "settle_s", where, default=3.0, lo=0, lo_open=True)
        size = d.get("payload_bytes", 64)
        if type(size) is not int or not 1 <= size <= 65536:
            self.fail(
                f"'payload_bytes' must be an integer in 1..65536, got {size!r}",
                *where,
                "payload_bytes",
            )
        assert every is not None and start is not None and settle is not None
        return MeshSpec(enabled, every, start, until, size, settle)

    def registry(self, d: Any) -> RegistrySpec:
        where = ("registry", 0)
        if type(d) is not dict:
            self.fail("'registry' must be a table: write [registry]", "", 0, "registry")
        self._unknown(d, _REGISTRY_KEYS, where, "[registry]")
        ints: dict[str, int] = {}
        for k in ("names_per_node", "groups", "joins_per_node"):
            v = d.get(k, 0)
            if type(v) is not int or v < 0:
                self.fail(f"'{k}' must be an integer >= 0, got {v!r}", *where, k)
            ints[k] = v
        if ints["joins_per_node"] and not ints["groups"]:
            self.fail(
                "'joins_per_node' needs 'groups' (how many groups there are)",
                *where,
                "joins_per_node",
            )
        churn = self._num(d, "churn_per_node_s", where, default=0.0, lo=0)
        churn_from = self._num(d, "churn_from_s", where, default=0.0, lo=0)
        churn_until = self._num(d, "churn_until_s", where, lo=0)
        scope = d.get("scope", "default")
        if type(scope) is not str or not scope or len(scope.encode()) > 64:
            self.fail("'scope' must be a name of 1 to 64 bytes", *where, "scope")
        preload = self._bool(d, "preload", where, True)
        start = self._num(d, "start_s", where, default=0.0, lo=0)
        over = self._num(d, "over_s", where, default=0.0, lo=0)
        if preload and (start or over):
            self.fail(
                "'start_s'/'over_s' are for preload = false (registrations at run time)",
                *where,
                "start_s" if start else "over_s",
            )
        on_start = self._num(d, "on_start_s", where, lo=0)
        assert churn is not None and churn_from is not None and start is not None
        assert over is not None
        return RegistrySpec(
            ints["names_per_node"],
            ints["groups"],
            ints["joins_per_node"],
            churn,
            churn_from,
            churn_until,
            scope,
            preload,
            start,
            over,
            on_start,
        )

    def network(self, d: Any) -> NetworkSpec:
        where = ("network", 0)
        if type(d) is not dict:
            self.fail("'network' must be a table", "", 0, "network")
        self._unknown(d, _NETWORK_KEYS, where, "[network]")
        lat = d.get("latency_ms", {"min": 1, "max": 10})
        if type(lat) in (int, float):
            lat = {"min": lat, "max": lat}
        if type(lat) is not dict:
            self.fail(
                "'latency_ms' must be a number or { min = 1, max = 10 }", *where, "latency_ms"
            )
        for k in lat:
            if k not in ("min", "max", "dist"):
                self.fail(f"unknown key '{k}' in latency_ms (min, max, dist)", *where, "latency_ms")
        lo = self._num(lat, "min", where, default=1.0, lo=0)
        hi = self._num(lat, "max", where, default=lo, lo=0)
        assert lo is not None and hi is not None
        if hi < lo:
            self.fail(f"latency_ms max ({hi:g}) is below min ({lo:g})", *where, "latency_ms")
        dist = lat.get("dist", "uniform")
        if dist not in ("uniform", "exponential"):
            self.fail('latency_ms dist must be "uniform" or "exponential"', *where, "latency_ms")
        loss = self._num_or(d, "loss", where, 0.0, lo=0, hi=1)
        dup = self._num_or(d, "duplicate", where, 0.0, lo=0, hi=1)
        reorder = self._num_or(d, "reorder", where, 0.0, lo=0, hi=1)
        reorder_ms = self._num_or(d, "reorder_ms", where, max(20.0, 2 * hi), lo=0)
        mtu = self._num_or(d, "mtu", where, 1472, lo=200, hi=65507)
        seal = self._bool(d, "seal", where, False)
        st = self._num_or(d, "stream_timeout_s", where, 15.0, lo=0, lo_open=True)
        link = self._num_or(d, "link_ms", where, 0.0, lo=0)
        return NetworkSpec(
            Latency(lo, hi, dist), loss, dup, reorder, reorder_ms, int(mtu), seal, st, link
        )

    def config(self, preset: str, d: Any) -> cfgmod.SwimConfig:
        if type(d) is not dict:
            self.fail("'config' must be a table of SwimConfig fields", "", 0, "config")
        base = cfgmod.PRESETS[preset]()
        fields = {f.name: f for f in dataclasses.fields(cfgmod.SwimConfig)}
        changes: dict[str, Any] = {}
        for k, v in d.items():
            if k not in fields:
                hint = _closest(k, set(fields))
                extra = f" (did you mean '{hint}'?)" if hint else ""
                self.fail(f"unknown SwimConfig field '{k}' in [config]{extra}", "config", 0, k)
            cur = getattr(base, k)
            if type(cur) is bool:
                if type(v) is not bool:
                    self.fail(f"'{k}' must be true or false", "config", 0, k)
            elif type(cur) is int:
                if type(v) is not int or v < 0:
                    self.fail(f"'{k}' must be an integer >= 0", "config", 0, k)
            elif type(v) not in (int, float) or v < 0:
                self.fail(f"'{k}' must be a number >= 0", "config", 0, k)
            changes[k] = float(v) if type(cur) is float else v
        return base.replace(**changes)

    def fault(self, i: int, d: Any) -> Fault:
        where = ("fault", i)
        if type(d) is not dict:
            self.fail("each [[fault]] must be a table", *where)
        kind = d.get("kind")
        if kind not in FAULT_KINDS:
            self.fail(
                f"fault 'kind' must be one of {' | '.join(FAULT_KINDS)}, got {kind!r}",
                *where,
                "kind",
            )
        self._unknown(d, _COMMON_FAULT_KEYS | _FAULT_KEYS[kind], where, f"a '{kind}' fault")
        for k in _REQUIRED[kind]:
            if k not in d:
                self.fail(f"a '{kind}' fault needs '{k}'", *where)
        at = self._num(d, "at_s", where, lo=0, required=True)
        kw: dict[str, Any] = {}
        if "nodes" in d:
            kw["nodes"] = self._selection(d["nodes"], where, "nodes")
        if "from" in d:
            kw["src"] = self._selection(d["from"], where, "from")
        if "to" in d:
            kw["dst"] = self._selection(d["to"], where, "to")
        if "duration_s" in d:
            kw["duration_s"] = self._num(d, "duration_s", where, lo=0, lo_open=True)
        if "groups" in d:
            g = d["groups"]
            if (
                type(g) is not list
                or len(g) < 2
                or any(type(x) not in (int, float) or x <= 0 for x in g)
            ):
                self.fail(
                    "'groups' must list at least two positive fractions, e.g. [0.5, 0.5]",
                    *where,
                    "groups",
                )
            if abs(sum(g) - 1.0) > 1e-6:
                self.fail(f"'groups' fractions must add up to 1, got {sum(g):g}", *where, "groups")
            kw["groups"] = tuple(float(x) for x in g)
        if "loss" in d:
            kw["loss"] = self._num(d, "loss", where, lo=0, hi=1)
        if "delay_ms" in d:
            kw["delay_ms"] = self._num(d, "delay_ms", where, lo=0, lo_open=True)
        if "down_s" in d:
            kw["down_s"] = self._num(d, "down_s", where, lo=0)
        kw["icmp"] = self._bool(d, "icmp", where, True)
        kw["symmetric"] = self._bool(d, "symmetric", where, False)
        repeat = d.get("repeat", 1)
        if type(repeat) is not int or repeat < 1:
            self.fail(f"'repeat' must be an integer >= 1, got {repeat!r}", *where, "repeat")
        every = self._num(d, "every_s", where, default=0.0, lo=0)
        if repeat > 1 and not every:
            self.fail("'repeat' needs 'every_s' (seconds between repetitions)", *where, "repeat")
        over = self._num(d, "over_s", where, default=0.0, lo=0)
        if kind == "register":
            names = d["names"]
            if type(names) is not int or names < 1:
                self.fail(f"'names' must be an integer >= 1, got {names!r}", *where, "names")
            kw["names"] = names
            prefix = d.get("prefix", "shared")
            if type(prefix) is not str or not prefix:
                self.fail("'prefix' must be non-empty text", *where, "prefix")
            kw["prefix"] = prefix
        assert at is not None
        return Fault(
            i,
            self.lines.of(*where),
            at,
            kind,
            repeat=repeat,
            every_s=every or 0.0,
            over_s=over or 0.0,
            **kw,
        )

    def expect(self, i: int, d: Any) -> Expect:
        where = ("expect", i)
        if type(d) is not dict:
            self.fail("each [[expect]] must be a table", *where)
        self._unknown(d, _EXPECT_KEYS, where, "an [[expect]]")
        check = d.get("check")
        if check not in CHECK_NEEDS:
            self.fail(
                f"unknown check {check!r}; known: {', '.join(sorted(CHECK_NEEDS))}", *where, "check"
            )
        for k in CHECK_NEEDS[check]:
            if k not in d:
                self.fail(f"check '{check}' needs '{k}'", *where)
        after = self._num(d, "after_s", where, default=0.0, lo=0)
        within = self._num(d, "within_s", where, lo=0, lo_open=True)
        mx = self._num(d, "max", where)
        mn = self._num(d, "min", where)
        nodes = self._selection(d["nodes"], where, "nodes") if "nodes" in d else None
        max_ms = self._num(d, "max_ms", where, lo=0, lo_open=True)
        until = self._num(d, "until_s", where, lo=0)
        assert after is not None
        if until is not None:
            if check not in WINDOWED_CHECKS:
                self.fail(
                    f"check '{check}' takes no 'until_s' (only "
                    f"{', '.join(sorted(WINDOWED_CHECKS))} judge a window of sends)",
                    *where,
                    "until_s",
                )
            if until <= after:
                self.fail(f"'until_s' ({until:g}) must be after 'after_s' ({after:g})", *where)
        return Expect(i, self.lines.of(*where), check, after, within, mx, mn, nodes, max_ms, until)


def _closest(word: str, options: set[str]) -> str | None:
    import difflib

    found = difflib.get_close_matches(word, sorted(options), n=1, cutoff=0.7)
    return found[0] if found else None
