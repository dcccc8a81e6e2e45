"""Daemon log lines: one line per event, to stderr.

Format (grep- and journald-friendly, UTC, logfmt-style fields)::

    2026-11-21T12:00:00Z info  member joined name=web1 id=9f3a... addr=10.0.0.5:7950

Under systemd, when stderr is the journal (``JOURNAL_STREAM`` matches, see
:func:`peerd.shell.systemd.stderr_is_journal`), each line starts with a
``<N>`` syslog priority instead of the timestamp, which journald adds::

    <6>info  member joined name=web1 id=9f3a... addr=10.0.0.5:7950

so ``journalctl -p warning -u peerd`` shows warnings and errors only.

Lines that can be triggered from the network (dropped packets, failed
streams) go through a :class:`RateLimiter`, so a flood of garbage costs a
counter increment, not a log line (and never a traceback) per packet.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from peerd.api.protocol import format_addr
from peerd.core.events import LogLevel

__all__ = ["format_addr"]  # re-exported: log fields print addresses the API's way

LEVEL_NAMES: dict[str, LogLevel] = {
    "debug": LogLevel.DEBUG,
    "info": LogLevel.INFO,
    "warning": LogLevel.WARNING,
    "error": LogLevel.ERROR,
}

# syslog priorities (sd-daemon(3)): what journald files each line under.
PRIORITIES = {
    LogLevel.DEBUG: 7,
    LogLevel.INFO: 6,
    LogLevel.WARNING: 4,
    LogLevel.ERROR: 3,
}

_LABELS = {
    LogLevel.DEBUG: "debug",
    LogLevel.INFO: "info",
    LogLevel.WARNING: "warn",
    LogLevel.ERROR: "error",
}


def format_value(value: object) -> str:
    """Render one field value; quote it when it would split the line apart."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        return format_addr(value)
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    return text


class Logger:
    """Writes one line per event at or above ``level``.

    The clock and stream are injectable so tests can assert exact lines.
    ``journal`` writes ``<N>`` priority prefixes instead of timestamps.
    """

    def __init__(
        self,
        level: LogLevel = LogLevel.INFO,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.time,
        journal: bool = False,
    ) -> None:
        self.level = level
        self.journal = journal
        self._stream = stream
        self._clock = clock

    def enabled(self, level: LogLevel) -> bool:
        return level >= self.level

    def log(self, level: LogLevel, message: str, **fields: object) -> None:
        if level < self.level:
            return
        label = f"{_LABELS.get(level, str(int(level))):<5}"
        if self.journal:
            parts = [f"<{PRIORITIES.get(level, 6)}>{label}", message]
        else:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._clock()))
            parts = [stamp, label, message]
        parts.extend(f"{k}={format_value(v)}" for k, v in fields.items())
        self._write(" ".join(parts) + "\n")

    def debug(self, message: str, **fields: object) -> None:
        self.log(LogLevel.DEBUG, message, **fields)

    def info(self, message: str, **fields: object) -> None:
        self.log(LogLevel.INFO, message, **fields)

    def warning(self, message: str, **fields: object) -> None:
        self.log(LogLevel.WARNING, message, **fields)

    def error(self, message: str, **fields: object) -> None:
        self.log(LogLevel.ERROR, message, **fields)

    def exception(self, message: str, exc: BaseException, **fields: object) -> None:
        """An error line followed by the traceback, indented so it reads as one event."""
        self.error(message, error=f"{type(exc).__name__}: {exc}", **fields)
        tb = "".join(traceback.format_exception(exc))
        # journald makes one entry per line: each needs its priority.
        prefix = f"<{PRIORITIES[LogLevel.ERROR]}>    " if self.journal else "    "
        self._write("".join(prefix + line + "\n" for line in tb.rstrip("\n").split("\n")))

    def _write(self, text: str) -> None:
        stream = self._stream if self._stream is not None else sys.stderr
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):
            # A closed or broken stderr must not take the daemon down.
            pass


@dataclass
class _Bucket:
    window_start: float
    emitted: int = 0
    suppressed: int = 0


@dataclass
class RateLimiter:
    """Allows ``burst`` lines per ``key`` per ``interval_s``; counts the rest.

    When a new window opens, the first line carries ``suppressed=N`` for what
    was swallowed in the previous one, so nothing vanishes silently.
    """

    interval_s: float = 10.0
    burst: int = 5
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def check(self, key: str) -> tuple[bool, int]:
        """Returns (emit?, suppressed count to report with this line)."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None or now - bucket.window_start >= self.interval_s:
            carried = bucket.suppressed if bucket is not None else 0
            self._buckets[key] = _Bucket(window_start=now, emitted=1)
            if len(self._buckets) > 1024:
                self._expire(now)
            return True, carried
        if bucket.emitted < self.burst:
            bucket.emitted += 1
            return True, 0
        bucket.suppressed += 1
        return False, 0

    def _expire(self, now: float) -> None:
        # Keys can come from the network (drop reasons are bounded, but be safe).
        stale = [k for k, b in self._buckets.items() if now - b.window_start >= self.interval_s]
        for k in stale:
            del self._buckets[k]


class LimitedLog:
    """A :class:`Logger` front for network-triggered lines, rate limited per key."""

    def __init__(self, logger: Logger, limiter: RateLimiter | None = None) -> None:
        self.logger = logger
        self.limiter = limiter if limiter is not None else RateLimiter()

    def log(self, key: str, level: LogLevel, message: str, **fields: object) -> None:
        if not self.logger.enabled(level):
            return
        emit, suppressed = self.limiter.check(key)
        if not emit:
            return
        if suppressed:
            fields["suppressed"] = suppressed
        self.logger.log(level, message, **fields)


class StdlibBridge(logging.Handler):
    """Routes stdlib ``logging`` records (e.g. the API server's) into one
    :class:`Logger`, so the daemon writes a single line format."""

    _LEVELS = (
        (logging.ERROR, LogLevel.ERROR),
        (logging.WARNING, LogLevel.WARNING),
        (logging.INFO, LogLevel.INFO),
    )

    def __init__(self, logger: Logger) -> None:
        super().__init__(logging.DEBUG)
        self.target = logger

    def emit(self, record: logging.LogRecord) -> None:
        level = next(
            (ours for theirs, ours in self._LEVELS if record.levelno >= theirs), LogLevel.DEBUG
        )
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not kill the daemon
            message = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            self.target.exception(message, record.exc_info[1], source=record.name)
        else:
            self.target.log(level, message, source=record.name)


def install_stdlib_bridge(logger: Logger) -> None:
    """Send every stdlib ``peerd.*`` log record through ``logger``."""
    root = logging.getLogger("peerd")
    for handler in list(root.handlers):
        if isinstance(handler, StdlibBridge):
            root.removeHandler(handler)
    root.addHandler(StdlibBridge(logger))
    root.setLevel(logging.DEBUG if logger.level <= LogLevel.DEBUG else logging.INFO)
    root.propagate = False
