"""membership.copies_per_update: copies of membership updates received per
(node, update) a node learnt from one."""

from __future__ import annotations

from peerd.core.swim import formulas
from peerd.core.swim.base import RING_SUCCESSORS

from .helpers import run, scenario

NO_MESH = "[mesh]\nenabled = false\n"


def test_no_updates_no_figure() -> None:
    _w, rec, s = run(scenario(NO_MESH, nodes=20, duration=10))
    assert rec.update_copies == 0 and rec.update_news == 0
    assert s["membership"]["copies_per_update"] is None


def test_crash_copies_are_bounded_by_the_retransmit_limit() -> None:
    n, crashed = 30, 3
    body = NO_MESH + f'[[fault]]\nat_s = 5\nkind = "crash"\nnodes = {crashed}\n'
    w, rec, s = run(scenario(body, nodes=n, duration=20))
    survivors = n - crashed
    # Each survivor learnt each death once (from a copy, or by its own
    # detection: then no news is counted); nothing else changed.
    assert survivors * crashed * 0.8 <= rec.update_news <= survivors * crashed
    cpu = s["membership"]["copies_per_update"]
    assert cpu == round(rec.update_copies / rec.update_news, 3)
    # The floor is one copy; the ceiling, the sends of every survivor: each
    # gossips a death at most retransmit_limit times (sends and copies heard
    # together) and passes it to its RING_SUCCESSORS.
    assert 1.0 <= cpu <= formulas.retransmit_limit(4, n) + RING_SUCCESSORS
    # The counters of the survivors are in the totals (and are all the
    # totals here: the crashed nodes got no updates before they crashed).
    assert rec.update_copies == sum(
        h.cur.node.counters["update_copies_in"] for h in w.hosts if h.cur is not None
    )
    assert "update_copies_in" not in s["core"]


def test_copies_of_stopped_processes_count() -> None:
    # Three nodes leave at 5 s; three others crash at 15 s, after they heard
    # of the leaves: their copies count too.
    body = (
        NO_MESH
        + '[[fault]]\nat_s = 5\nkind = "leave"\nnodes = [1, 2, 3]\n'
        + '[[fault]]\nat_s = 15\nkind = "crash"\nnodes = [4, 5, 6]\n'
    )
    w, rec, s = run(scenario(body, nodes=20, duration=16))
    running = sum(h.cur.node.counters["update_copies_in"] for h in w.hosts if h.cur is not None)
    assert rec.update_copies > running
    assert s["membership"]["copies_per_update"] >= 1.0
