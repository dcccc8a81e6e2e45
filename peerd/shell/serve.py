"""Serving: the services around the runner, signals, and the exit code.

A daemon is the runner plus services (UDP, TCP, the API server, systemd
notification) started in order under one nursery; a service that fails before
it reports ready is a start-up failure (exit 1), one that raises later is a
bug of the shell (exit 70, logged once with its traceback). A core that raises
on one input is not fatal (:mod:`peerd.shell.guard`), except on ``Start``.
SIGINT/SIGTERM start a graceful leave, a second one exits without waiting;
SIGHUP awaits the ``on_reload`` given to :func:`serve`. The peers file (join
hints for the next start) is rewritten soon after membership changes and at
an interval, and once more after a clean exit.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from peerd.shell.ports import CoreFailure
from peerd.shell.runner import Runner

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BUG = 70  # EX_SOFTWARE: internal error; systemd restarts us

PEERS_SAVE_DEBOUNCE_S = 0.2


class _StartStatus:
    """Wraps a TaskStatus to know whether the service reported ready."""

    def __init__(self, inner: trio.TaskStatus[Any]) -> None:
        self.inner = inner
        self.called = False

    def started(self, value: Any = None) -> None:
        self.called = True
        self.inner.started(value)


Service = Callable[..., Awaitable[None]]
"""An async callable taking ``task_status=`` (like ``trio.serve_listeners``)."""


async def serve(
    runner: Runner,
    services: Sequence[Service] = (),
    *,
    handle_signals: bool = False,
    peers_save_interval_s: float = 60.0,
    flush_timeout_s: float = 1.0,
    on_reload: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Start ``services`` in order, then the runner; return the exit code.

    0 after the node left (signal or API leave); 1 if a service failed to
    start (its message is logged); 70 if a running service or the runner
    itself raised, or the core raised on ``Start``, which is a bug (logged
    once, with the traceback). The core raising on any other input is counted
    and logged by the runner, and the daemon goes on.

    With ``handle_signals``, SIGINT and SIGTERM start a graceful leave, and
    SIGHUP awaits ``on_reload`` (one reload at a time; ignored without one).
    """
    exit_code = EXIT_OK

    async def guard(
        fn: Service,
        nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        nonlocal exit_code
        status = _StartStatus(task_status)
        try:
            await fn(task_status=status)
        except Exception as e:
            if not status.called:
                raise  # nursery.start() re-raises it: a start-up failure
            runner.logger.exception("internal error: this is a bug; exiting", e)
            exit_code = EXIT_BUG
            nursery.cancel_scope.cancel()

    async def peers_saver(*, task_status: trio.TaskStatus[Any]) -> None:
        # Save soon after membership changes (debounced), and at least every
        # interval; no wake-ups at all while nothing changes.
        task_status.started()
        while True:
            with trio.move_on_after(peers_save_interval_s):
                await runner.peers_changed.wait()
                await trio.sleep(PEERS_SAVE_DEBOUNCE_S)
            runner.peers_changed = trio.Event()
            await runner.save_peers()

    async def signals(*, task_status: trio.TaskStatus[Any]) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as received:
            task_status.started()
            count = 0
            async for signum in received:
                if signum == signal.SIGHUP:
                    if on_reload is None:
                        runner.logger.info("SIGHUP ignored: nothing to reload")
                    elif not runner.leaving and not runner.finished:
                        try:
                            await on_reload()
                        except Exception as e:  # a failed reload keeps the running config
                            runner.logger.exception(
                                "reload failed; the running configuration stays", e
                            )
                    continue
                count += 1
                name = signal.Signals(signum).name
                if count == 1:
                    await runner.shutdown(name)
                else:
                    runner.logger.warning("second signal: exiting without waiting", signal=name)
                    nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        extra: list[Service] = []
        if handle_signals:
            extra.append(signals)
        if runner.state is not None and peers_save_interval_s > 0:
            extra.append(peers_saver)
        try:
            for fn in [*extra, *services]:
                await nursery.start(guard, fn, nursery)
        except Exception as e:
            runner.logger.error("start-up failed", error=str(e) or type(e).__name__)
            nursery.cancel_scope.cancel()
            return EXIT_FAILURE
        try:
            await runner.run()
        except CoreFailure:
            exit_code = EXIT_BUG  # the core raised on Start (logged, with the traceback)
        except Exception as e:
            # Carrying out an output failed: a bug in the shell.
            runner.logger.exception("runner failed: this is a bug; exiting", e)
            exit_code = EXIT_BUG
        else:
            # Let API calls that waited for the leave send their answers.
            with trio.move_on_after(flush_timeout_s):
                while runner.in_flight:
                    await trio.sleep(0.01)
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    if exit_code == EXIT_OK:
        runner.save_peers_now()
    return exit_code
