"""Table tests for the pure SWIM/Lifeguard formulas."""

from __future__ import annotations

import math

import pytest

from peerd.core.swim import formulas


@pytest.mark.parametrize(
    ("mult", "n", "expected"),
    [
        (4, 0, 4),  # log10(1) = 0: still at least one round
        (4, 1, 4),
        (4, 9, 4),  # log10(10) = 1
        (4, 10, 8),  # log10(11) rounds up to 2
        (4, 99, 8),
        (4, 100, 12),
        (3, 999, 9),
        (3, 1000, 12),
        (1, 5, 1),
        (0, 50, 0),
    ],
)
def test_retransmit_limit(mult: int, n: int, expected: int) -> None:
    assert formulas.retransmit_limit(mult, n) == expected


@pytest.mark.parametrize(
    ("mult", "max_mult", "n", "interval", "expected"),
    [
        (3.0, 6.0, 0, 1.0, (3.0, 18.0)),  # n below 1 counts as 1
        (3.0, 6.0, 1, 1.0, (3.0, 18.0)),
        (3.0, 6.0, 5, 1.0, (3.0, 18.0)),  # log10(5) < 1: floor of one
        (3.0, 6.0, 10, 1.0, (3.0, 18.0)),
        (3.0, 6.0, 100, 1.0, (6.0, 36.0)),
        (3.0, 6.0, 1000, 0.5, (4.5, 27.0)),
        (5.0, 6.0, 5, 1.0, (5.0, 30.0)),
        (4.0, 2.0, 10_000, 2.0, (32.0, 64.0)),
        (6.0, 6.0, 50, 5.0, (6.0 * math.log10(50) * 5.0, 6.0 * math.log10(50) * 5.0 * 6.0)),
    ],
)
def test_suspicion_bounds(
    mult: float, max_mult: float, n: int, interval: float, expected: tuple[float, float]
) -> None:
    assert formulas.suspicion_bounds(mult, max_mult, n, interval) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("mult", "n", "expected"),
    [
        (3.0, 3, 1),
        (3.0, 2, 0),  # n - 2 < K: too few nodes to confirm, run at the minimum
        (3.0, 1000, 1),
        (5.0, 5, 3),
        (5.0, 4, 0),
        (2.0, 100, 0),
        (1.5, 100, 0),  # never negative
        (6.9, 100, 4),  # int() truncates the multiplier
        (6.0, 6, 4),
        (6.0, 5, 0),
    ],
)
def test_expected_confirmations(mult: float, n: int, expected: int) -> None:
    assert formulas.expected_confirmations(mult, n) == expected


@pytest.mark.parametrize(
    ("low", "high", "k", "c", "expected"),
    [
        (3.0, 18.0, 0, 0, 3.0),  # K = 0: the minimum from the start
        (3.0, 18.0, 0, 5, 3.0),
        (3.0, 18.0, 1, 0, 18.0),  # no confirmation yet: the maximum
        (3.0, 18.0, 1, 1, 3.0),
        (5.0, 30.0, 3, 0, 30.0),
        (5.0, 30.0, 3, 1, 17.5),  # log(2) / log(4) = 1/2
        (5.0, 30.0, 3, 2, 30.0 - 25.0 * math.log(3) / math.log(4)),
        (5.0, 30.0, 3, 3, 5.0),
        (5.0, 30.0, 3, 10, 5.0),  # never below the minimum
        (2.0, 10.0, 7, 1, 10.0 - 8.0 / 3.0),  # log(2) / log(8) = 1/3
    ],
)
def test_suspicion_timeout(low: float, high: float, k: int, c: int, expected: float) -> None:
    assert formulas.suspicion_timeout(low, high, k, c) == pytest.approx(expected)


def test_suspicion_timeout_shrinks_monotonically() -> None:
    values = [formulas.suspicion_timeout(5.0, 30.0, 4, c) for c in range(6)]
    assert values == sorted(values, reverse=True)
    assert values[0] == 30.0 and values[4] == pytest.approx(5.0) and values[5] == 5.0


@pytest.mark.parametrize(
    ("interval", "n", "expected"),
    [
        (30.0, 0, 30.0),
        (30.0, 1, 30.0),
        (30.0, 32, 30.0),
        (30.0, 33, 60.0),
        (30.0, 64, 60.0),  # log2(64) - log2(32) = 1 exactly
        (30.0, 65, 90.0),
        (30.0, 1024, 180.0),
        (30.0, 1025, 210.0),
        (15.0, 10_000, 15.0 * 10),  # ceil(13.29 - 5) + 1 = 10
        (0.0, 5000, 0.0),
    ],
)
def test_push_pull_scale(interval: float, n: int, expected: float) -> None:
    assert formulas.push_pull_scale(interval, n) == expected


@pytest.mark.parametrize(
    ("value", "score", "expected"),
    [
        (1.0, 0, 1.0),
        (1.0, 1, 2.0),
        (0.5, 3, 2.0),
        (1.0, 7, 8.0),
        (0.2, 0, 0.2),
    ],
)
def test_scaled(value: float, score: int, expected: float) -> None:
    assert formulas.scaled(value, score) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("timeout", "interval", "expected"),
    [
        (0.5, 1.0, 0.4),  # lan: the nack lands at 0.9 s, inside the 1 s period
        (3.0, 5.0, 1.6),  # wan: what is left of the period is the tighter bound
        (0.2, 1.0, 0.16),  # local
        (1.0, 1.0, 0.0),  # no room left: nack at once
    ],
)
def test_nack_delay_keeps_the_nack_inside_the_requesters_period(
    timeout: float, interval: float, expected: float
) -> None:
    delay = formulas.nack_delay(timeout, interval, 0.8)
    assert delay == pytest.approx(expected)
    assert timeout + delay <= interval
