"""Log lines: one per event, stable format, floods rate limited."""

from __future__ import annotations

import io
import logging

from peerd.core.events import LogLevel
from peerd.shell.logs import LimitedLog, Logger, RateLimiter, install_stdlib_bridge

T0 = 1795262400.0  # 2026-11-21T12:00:00Z


def make(level: LogLevel = LogLevel.INFO) -> tuple[Logger, io.StringIO]:
    out = io.StringIO()
    return Logger(level, stream=out, clock=lambda: T0), out


def test_line_format() -> None:
    logger, out = make()
    logger.info("member joined", name="web1", id=b"\x01\x02", addr=("10.0.0.5", 7950))
    logger.warning("x", addr=("::1", 1), note="two words", empty="")
    lines = out.getvalue().splitlines()
    assert lines[0] == (
        "2026-11-21T12:00:00Z info  member joined name=web1 id=0102 addr=10.0.0.5:7950"
    )
    assert lines[1] == '2026-11-21T12:00:00Z warn  x addr=[::1]:1 note="two words" empty=""'


def test_level_filter() -> None:
    logger, out = make(LogLevel.WARNING)
    logger.info("hidden")
    logger.debug("hidden")
    logger.error("shown")
    assert out.getvalue().count("\n") == 1
    assert " error shown" in out.getvalue()


def test_exception_is_one_event_with_indented_traceback() -> None:
    logger, out = make()
    try:
        raise ValueError("boom")
    except ValueError as e:
        logger.exception("core failed", e)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith('core failed error="ValueError: boom"')
    assert all(line.startswith("    ") for line in lines[1:])
    assert any("Traceback" in line for line in lines)


def test_rate_limiter_counts_what_it_suppresses() -> None:
    now = [0.0]
    limiter = RateLimiter(interval_s=10.0, burst=2, clock=lambda: now[0])
    logger, out = make(LogLevel.DEBUG)
    log = LimitedLog(logger, limiter)
    for _ in range(50):
        log.log("udp_drop_auth", LogLevel.WARNING, "datagram rejected")
    log.log("other", LogLevel.WARNING, "different key")
    assert out.getvalue().count("datagram rejected") == 2
    now[0] = 11.0
    log.log("udp_drop_auth", LogLevel.WARNING, "datagram rejected")
    assert out.getvalue().splitlines()[-1].endswith("datagram rejected suppressed=48")
    assert out.getvalue().count("different key") == 1


def test_stdlib_records_use_the_same_format() -> None:
    logger, out = make()
    root = logging.getLogger("peerd")
    saved = (list(root.handlers), root.level, root.propagate)
    try:
        install_stdlib_bridge(logger)
        logging.getLogger("peerd.api").info("API connection %s opened", 3)
    finally:
        root.handlers[:], root.level, root.propagate = saved
    assert out.getvalue() == (
        "2026-11-21T12:00:00Z info  API connection 3 opened source=peerd.api\n"
    )
