"""Containing a core bug to the one input that hit it.

The core turns bad input into counted drops, so an exception out of
``Peer.handle`` is a bug. It used to stop the daemon (exit 70, systemd
restarts it). But the input that hit the bug may come from the network: a
datagram that trips it is gossiped on, reaches every node within seconds,
and an exit-on-bug daemon then stops the whole cluster at once. Erlang/OTP's
answer, a supervisor restarting the failed worker, does not fit one pure
object that holds the node's whole state; what fits is the one-request
failure boundary of a server (a web server answers 500 to the request that
crashed its handler and serves the next one): the runner catches the
exception of one ``handle`` call, counts it (``core_errors_<kind>``, shown as
``peerd_core_errors_total{kind=...}``), logs it and feeds the next input.

What state the core is left in: ``handle`` builds its outputs in a list it
returns, so an input that raised produced *no* outputs (none are carried
out, not even those decided before the raise); the changes it made to the
core's tables before the raise stay. Most inputs are single steps (one
message, one timer), so that is a partial step, like a message lost half way.
The dangerous case is a timer: periodic work (probing, gossip, push-pull,
reaping) re-arms itself in the outputs of its own timer, so a timer whose
handling raised would stop that loop for good. Such a timer is therefore fed
again after a back-off (1 s, doubling to 60 s per timer); timers carry
tokens, so one that became stale meanwhile is ignored by the core.

An input fed by an API call (a registration, tags, a send) that raised
fails that call at once with an ``internal`` error, instead of leaving the
client waiting for an answer the core will never give.

Only the core is guarded per input. ``Start`` raising is still fatal (the
node never started: there is nothing to keep serving), and an exception
while the shell carries out outputs is a bug of the shell, which still
stops the daemon (:mod:`peerd.shell.serve`, exit 70).

Logging: the first failure of each distinct bug (kind of input, exception
type and the line that raised) is logged with its traceback; after that,
lines per kind are rate limited, each saying how many were suppressed.
"""

from __future__ import annotations

import collections
import re
import traceback
from collections.abc import Callable
from typing import Any

from peerd.api.protocol import ApiError, ErrorCode
from peerd.core.events import LogLevel, MessageIn, PacketIn, PeerInput, StreamRequest, TimerFired
from peerd.shell.logs import LimitedLog, Logger, RateLimiter
from peerd.shell.metrics import message_sizes, stream_message_type
from peerd.shell.ports import CoreFailure

COUNTER_PREFIX = "core_errors_"
MESSAGE = "core raised on one input (a bug): input dropped, the daemon goes on"
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0
# Bounds on what the guard remembers (bugs seen, timers backing off).
MAX_SIGNATURES = 256
MAX_RETRYING = 1024

_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def input_kind(inp: object) -> str:
    """The metric label of an input: its class in snake case (``packet_in``)."""
    return _CAMEL.sub("_", type(inp).__name__).lower()


def _details(inp: object) -> dict[str, object]:
    """What helps find the poison, without dumping the input itself."""
    match inp:
        case PacketIn(src, data):
            return {"src": src, "messages": ",".join(t for t, _ in message_sizes(data))}
        case StreamRequest(_, src, data):
            return {"src": src, "message": stream_message_type(data)}
        case MessageIn(src, msg):
            return {"src": bytes(src).hex()[:8], "message": type(msg).__name__}
        case TimerFired(timer):
            return {"timer": type(timer).__name__}
    return {}


class CoreGuard:
    """Counts and logs a core exception for one input; says whether (and
    when) a failed timer is to be fed again."""

    def __init__(self, logger: Logger, counters: collections.Counter[str]) -> None:
        self.logger = logger
        self.counters = counters
        self.log = LimitedLog(logger, RateLimiter(interval_s=60.0, burst=5))
        self._signatures: set[tuple[str, str, str]] = set()
        self._retries: dict[Any, float] = {}
        self._in_call = 0

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run an API call's ``fn`` (in the runner): a core failure on an
        input it feeds fails the call (``internal``) instead of hanging it."""
        self._in_call += 1
        try:
            return fn()
        finally:
            self._in_call -= 1

    def failed(self, inp: PeerInput, exc: Exception, now: float) -> tuple[float, Any] | None:
        """``inp`` raised ``exc``: count and log it. Returns ``(at, timer)``
        when the timer of a failed :class:`TimerFired` is to be fed again.
        Raises :class:`CoreFailure` for ``Start``."""
        kind = input_kind(inp)
        if kind == "start":
            self.logger.exception("core failed to start: this is a bug; exiting", exc, kind=kind)
            raise CoreFailure("core raised on Start") from exc
        self.counters[COUNTER_PREFIX + kind] += 1
        try:
            self._log(inp, exc, kind)
        except Exception:  # describing a hostile input must not be the next bug
            self.logger.error(MESSAGE, kind=kind, error=type(exc).__name__)
        if self._in_call:
            raise ApiError(
                ErrorCode.INTERNAL, f"the daemon hit a bug on this request ({kind}); it is logged"
            ) from None
        if not isinstance(inp, TimerFired):
            return None
        timer = inp.timer
        try:
            delay = self._retries.get(timer, RETRY_FIRST_S / 2) * 2
        except TypeError:  # an unhashable timer: no back-off memory, but re-armed
            return now + RETRY_FIRST_S, timer
        delay = min(delay, RETRY_MAX_S)
        if len(self._retries) >= MAX_RETRYING:
            self._retries.clear()
        self._retries[timer] = delay
        return now + delay, timer

    def _log(self, inp: PeerInput, exc: Exception, kind: str) -> None:
        fields = {"kind": kind, **_details(inp)}
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        signature = (kind, type(exc).__name__, where)
        if signature not in self._signatures and len(self._signatures) < MAX_SIGNATURES:
            self._signatures.add(signature)
            self.logger.exception(MESSAGE, exc, **fields)
        else:
            error = f"{type(exc).__name__}: {exc}"
            self.log.log(f"core_error:{kind}", LogLevel.ERROR, MESSAGE, error=error, **fields)
