"""The lean claim index (peerd/core/registry/index.py) against the dict of
dicts it replaces: same claims in the same order after any operations."""

from __future__ import annotations

import random
from typing import Any

from peerd.core.registry.index import ClaimIndex, copy_value
from peerd.core.registry.state import Claim, winner
from peerd.sim.store import CowDict
from peerd.wire.messages import RegEntry, RegKind


def _entry(eid: int, name: str, ms: int) -> RegEntry:
    return RegEntry(eid, RegKind.NAME, "s", name, ms, eid, 0, ())


class _Ref:
    """The old index: (scope, name) -> {(origin, eid): claim}."""

    def __init__(self) -> None:
        self.d: dict[Any, dict[Any, Claim]] = {}

    def add(self, key: Any, claim: Claim) -> None:
        self.d.setdefault(key, {})[(claim.origin, claim.entry.eid)] = claim

    def remove(self, key: Any, origin: bytes, eid: int) -> None:
        claims = self.d.get(key)
        if claims is not None:
            claims.pop((origin, eid), None)
            if not claims:
                del self.d[key]

    def get(self, key: Any) -> list[Claim]:
        return list(self.d.get(key, {}).values())


class _Peek(dict):  # type: ignore[type-arg]
    peek = dict.get


def _check(idx: ClaimIndex, ref: _Ref, keys: list[Any]) -> None:
    assert sorted(idx.keys()) == sorted(ref.d)
    for k in keys:
        assert idx.get(k) == ref.get(k)
        assert [id(c) for c in idx.get(k)] == [id(c) for c in ref.get(k)]
        assert idx.count(k) == len(ref.get(k))
        assert winner(idx.get(k)) == winner(ref.get(k))


def _run(idx: ClaimIndex, ref: _Ref, seed: int, steps: int = 3000) -> None:
    rng = random.Random(seed)
    origins = [bytes([i]) * 16 for i in range(4)]
    keys = [("s", f"n{i}") for i in range(5)]
    for _ in range(steps):
        key = rng.choice(keys)
        origin = rng.choice(origins)
        eid = rng.randrange(6)
        if rng.random() < 0.55:
            c = Claim(origin, _entry(eid, key[1], rng.randrange(3)))
            idx.add(key, c)
            ref.add(key, c)
        else:
            idx.remove(key, origin, eid)
            ref.remove(key, origin, eid)
        _check(idx, ref, keys)


def test_claim_index_matches_a_dict_of_dicts() -> None:
    for seed in range(5):
        _run(ClaimIndex(), _Ref(), seed)


def test_single_claim_is_held_bare() -> None:
    idx = ClaimIndex()
    a = Claim(b"a" * 16, _entry(1, "x", 5))
    b = Claim(b"b" * 16, _entry(1, "x", 3))
    idx.add(("s", "x"), a)
    assert idx.table[("s", "x")] is a
    idx.add(("s", "x"), b)
    assert isinstance(idx.table[("s", "x")], dict)
    assert idx.get(("s", "x")) == [a, b]
    idx.remove(("s", "x"), a.origin, 1)
    assert idx.table[("s", "x")] is b
    idx.remove(("s", "x"), b.origin, 1)
    assert ("s", "x") not in idx.table


def test_copy_on_write_index_never_changes_its_base() -> None:
    base = ClaimIndex(_Peek())
    ref_base = _Ref()
    _run(base, ref_base, 99, steps=400)
    frozen = {k: copy_value(v) for k, v in base.table.items()}
    idx = ClaimIndex(CowDict(base.table, {}, copy_value))
    ref = _Ref()
    ref.d = {k: dict(v) for k, v in ref_base.d.items()}
    _run(idx, ref, 7)
    assert base.table == frozen
