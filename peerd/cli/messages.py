"""Messages and events: watch, send, event, exec.

``watch`` streams events until interrupted; ``send`` delivers one message to a
name's owner and prints the reply; ``event`` broadcasts a user event. ``exec``
registers names for the lifetime of a child process: the API connection holds
the names, so they go when the child or this process dies, and the child is
stopped when a name is lost to an older claim or the daemon goes away.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from peerd.api.protocol import SNAPSHOT_END, ApiError
from peerd.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    SHORT_ID,
    CliError,
    _call,
    _connect,
    _usage,
)
from peerd.cli.format import (
    REGISTRY_EVENTS,
    _print_json,
    conflict_warning,
    event_json,
    format_event,
    format_registry_event,
    format_snapshot_end,
    format_user_event,
)


def cmd_watch(args: argparse.Namespace) -> int:
    topics = list(dict.fromkeys(args.topic or ["members"]))
    with _connect(args, timeout=None) as client:
        try:
            for ev in client.watch(topics, snapshot=args.snapshot):
                topic = ev.data.get("topic")
                if args.json:
                    line = event_json(ev)
                elif ev.event == SNAPSHOT_END:
                    line = format_snapshot_end(ev)
                elif topic == "registry" or (
                    topic is None and ev.event in REGISTRY_EVENTS and "kind" in ev.data
                ):
                    line = format_registry_event(ev)
                elif ev.event == "user":
                    line = format_user_event(ev)
                else:
                    line = format_event(ev)
                print(line, flush=True)
        except KeyboardInterrupt:
            return EXIT_OK  # the normal way to stop watching
    print("peerd watch: the daemon ended the stream", file=sys.stderr)
    return EXIT_OK


def cmd_send(args: argparse.Namespace) -> int:
    if (args.reply_to is None) == (args.name is None):
        _usage("give NAME, or --reply-to TOKEN, and PAYLOAD")
    with _connect(args) as client:
        if args.reply_to is not None:
            if args.group or args.all:
                raise CliError("--reply-to takes no --group or --all", EXIT_USAGE)
            result = client.send(payload=args.payload.encode("utf-8"), reply_to=args.reply_to)
        elif args.group:
            result = client.send(
                group=args.name,
                payload=args.payload.encode("utf-8"),
                scope=args.scope,
                all=args.all,
            )
        else:
            if args.all:
                raise CliError("--all needs --group", EXIT_USAGE)
            result = client.send(args.name, args.payload.encode("utf-8"), scope=args.scope)
    if args.json:
        _print_json(result)
    else:
        failed = result.get("failed") or []
        print(
            f"delivered to {result.get('delivered', 0)}"
            + (f", failed for {len(failed)}" if failed else "")
        )
        for f in failed:
            print(
                f"  {str(f.get('node', '?'))[:SHORT_ID]}: {f.get('message')} ({f.get('code')})",
                file=sys.stderr,
            )
    return EXIT_OK if not result.get("failed") else EXIT_FAILED


def cmd_event(args: argparse.Namespace) -> int:
    result = _call(args, "event", name=args.name, payload=args.payload.encode("utf-8"))
    if args.json:
        _print_json(result)
    return EXIT_OK


SI_KERNEL = 0x80  # siginfo si_code of a signal sent by the kernel (the tty's ^C)


EXIT_NAME_LOST = 4  # peerd exec stopped COMMAND: a name was lost to an older claim
EXIT_DAEMON_LOST = 5  # peerd exec stopped COMMAND: the connection to the daemon was lost


def cmd_exec(args: argparse.Namespace) -> int:
    """Hold names and group memberships exactly as long as COMMAND runs.

    The registrations belong to this process's API connection: when the
    child exits, this process exits and the connection closes, so the
    daemon removes them cluster-wide (also if this process is killed).

    Safe by default: each name is claimed with ``wait="settled"`` (every
    live member acknowledged it) and COMMAND does not start if the claim
    lost. While it runs, a name lost to an older claim elsewhere (or the
    connection to the daemon, which takes the names with it) stops it
    (``--on-lose term``: SIGTERM, then SIGKILL after ``--grace`` seconds;
    exit 4, or 5 for the connection), or only warns (``--on-lose warn``).
    The entries take no messages (COMMAND cannot read them): a send to them
    fails ``no_receiver``."""
    import signal
    import subprocess
    import threading
    import time

    command = list(args.argv)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        _usage("no command given (peerd exec [--name N] [--group G] -- COMMAND ARGS)")
    if not args.names and not args.groups:
        _usage("give at least one --name or --group")
    if args.grace < 0:
        _usage("--grace must be at least 0")
    settle = not args.no_settle
    meta = dict(args.meta or [])
    client = _connect(args, timeout=None)
    try:
        for name in args.names:
            try:
                result = client.register(
                    name,
                    meta,
                    scope=args.scope,
                    wait="settled" if settle else None,
                    timeout_s=args.timeout if settle else None,
                    messages=False,
                )
            except ApiError as exc:
                raise CliError(f"cannot register {name!r}: {exc.message}") from None
            if settle and not result.get("won", True):
                raise CliError(f"cannot register {name!r}: an older claim elsewhere holds it")
            if settle and not result.get("settled", True):
                print(
                    f"peerd exec: warning: {name!r} not acknowledged by every member within "
                    f"{args.timeout:g} s; starting anyway (a conflict found later stops COMMAND "
                    "unless --on-lose warn)",
                    file=sys.stderr,
                    flush=True,
                )
        for group in args.groups:
            try:
                client.join_group(group, meta, scope=args.scope, messages=False)
            except ApiError as exc:
                raise CliError(f"cannot join group {group!r}: {exc.message}") from None
        # A name lost while the others settled: do not start at all.
        for ev in client.connection_events():
            if ev.event == "conflict":
                raise CliError(f"cannot register: {conflict_warning(ev)}")
    except BaseException:
        client.close()
        raise

    # Signals are taken synchronously (sigwaitinfo) so that a signal and the
    # child's exit can never race; the child starts with them unblocked.
    handled = {
        signal.SIGINT,
        signal.SIGTERM,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGCHLD,
    }
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    try:
        child = subprocess.Popen(
            command, preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        )
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        client.close()
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        raise CliError(f"cannot run {command[0]!r}: {exc.strerror or exc}", code) from None

    stopping = threading.Event()
    # The child's pid stays ours until poll() reaps it: signal it only under
    # this lock and while it is not reaped, so a recycled pid is never hit.
    child_lock = threading.Lock()
    lost: list[int] = []  # the exit code the stop stands for, once COMMAND is told
    stop_at: list[float] = []  # monotonic time of the SIGTERM

    def signal_child(signo: int) -> None:
        with child_lock:
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signo)

    def lose(why: str, code: int) -> None:
        if args.on_lose == "warn" or stopping.is_set():
            print(f"peerd exec: warning: {why}", file=sys.stderr, flush=True)
            return
        if lost:
            return
        print(
            f"peerd exec: {why}; stopping COMMAND (SIGTERM, SIGKILL after {args.grace:g} s)",
            file=sys.stderr,
            flush=True,
        )
        lost.append(code)
        stop_at.append(time.monotonic())
        signal_child(signal.SIGTERM)

    def read_events() -> None:
        while True:
            try:
                ev = client.wait_connection_event(None)
            except (ConnectionError, OSError):
                if not stopping.is_set():
                    lose(
                        "lost the connection to peerd; the registrations are gone",
                        EXIT_DAEMON_LOST,
                    )
                return
            if ev is not None and ev.event == "conflict":
                lose(conflict_warning(ev).removeprefix("warning: "), EXIT_NAME_LOST)

    reader = threading.Thread(target=read_events, name="peerd-exec-events", daemon=True)
    reader.start()
    killed = False
    try:
        while True:
            with child_lock:
                if child.poll() is not None:
                    break
            if stop_at and not killed and time.monotonic() - stop_at[0] >= args.grace:
                killed = True
                print(
                    f"peerd exec: COMMAND still runs {args.grace:g} s after SIGTERM; SIGKILL",
                    file=sys.stderr,
                    flush=True,
                )
                signal_child(signal.SIGKILL)
            # Bounded: run from a thread (tests), SIGCHLD may go to another one.
            info = signal.sigtimedwait(handled, 0.1)
            if info is None or info.si_signo == signal.SIGCHLD:
                continue
            # ^C and ^\ from the terminal already reached the child (same
            # process group): forwarding them would deliver them twice.
            if info.si_signo in (signal.SIGINT, signal.SIGQUIT) and info.si_code == SI_KERNEL:
                continue
            signal_child(info.si_signo)
    finally:
        stopping.set()
        client.close()  # the daemon drops the registrations now
        reader.join(1.0)  # warnings already received are printed
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    if lost:
        return lost[0]
    code = child.returncode
    return 128 - code if code < 0 else code
