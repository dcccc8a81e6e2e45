"""The ``peerd`` command: ``peerd agent`` runs the daemon; every other
subcommand is a small client of the local daemon's API socket.

Exit codes (all subcommands but ``agent``, which documents its own):
0 success; 1 the daemon refused or the operation failed; 2 usage error;
3 the daemon could not be reached.

The agent's flags live with the agent (:mod:`peerd.shell.agent`), imported only
when ``peerd agent`` runs: client commands then start fast and work even where
the daemon's dependencies are not importable.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import json
import os
import re
import socket
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

from peerd import __version__
from peerd.api.protocol import SNAPSHOT_END, ApiError, Event, format_addr, parse_addr

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

# "code" of a --json error that did not come from the daemon (whose codes,
# "not_found", "bad_args"..., pass through as they are), by exit code.
ERROR_KINDS = {EXIT_FAILED: "failed", EXIT_USAGE: "usage", EXIT_UNREACHABLE: "unreachable"}

MEMBER_STATUSES = ("alive", "suspect", "dead", "left")
SHORT_ID = 8  # hex digits of a node id shown in tables; --json has the full id


class CliError(Exception):
    """Ends the command with ``exit_code`` and ``message`` as one line on stderr."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _usage(message: str) -> NoReturn:
    raise CliError(message, EXIT_USAGE)


# --- formatting (pure, tested directly) ----------------------------------------------


def format_tags(tags: Mapping[str, Any]) -> str:
    """``k=v,k2=v2`` sorted by key, ``-`` when empty (keeps table columns aligned)."""
    if not tags:
        return "-"
    return ",".join(f"{k}={v}" for k, v in sorted(tags.items()))


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    all_rows = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(headers) - 1)]
    lines = []
    for row in all_rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _member_sort_key(m: Mapping[str, Any]) -> tuple[str, str]:
    return (str(m.get("name", "")), str(m.get("id", "")))


def format_members(members: Iterable[Mapping[str, Any]]) -> str:
    """The ``peerd members`` table: name, short id, address, status, incarnation, tags."""
    rows = [
        [
            str(m.get("name", "?")),
            str(m.get("id", "?"))[:SHORT_ID],
            str(m.get("addr", "?")),
            str(m.get("status", "?")),
            str(m.get("incarnation", "?")),
            format_tags(m.get("tags", {})),
        ]
        for m in sorted(members, key=_member_sort_key)
    ]
    return format_table(["NAME", "ID", "ADDRESS", "STATUS", "INC", "TAGS"], rows)


def format_status(status: Mapping[str, Any]) -> str:
    """The ``peerd status`` report, one ``label  value`` line per field."""
    counts = status.get("members", {})
    health = status.get("health", "?")
    health_text = (
        f"{health} (healthy)"
        if health == 0
        else f"{health} (degraded: this node may be slow or overloaded)"
        if isinstance(health, int)
        else str(health)
    )
    fields = [
        ("name", str(status.get("name", "?"))),
        ("id", str(status.get("id", "?"))),
        ("address", str(status.get("addr", "?"))),
        ("incarnation", str(status.get("incarnation", "?"))),
        ("generation", str(status.get("generation", "?"))),
        ("health", health_text),
        ("members", ", ".join(f"{counts.get(s, 0)} {s}" for s in MEMBER_STATUSES)),
        ("version", str(status.get("version", "?"))),
    ]
    if status.get("leaving"):
        fields.append(("leaving", "yes"))
    width = max(len(label) for label, _ in fields)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in fields)


def _member_brief(m: Mapping[str, Any]) -> str:
    return f"{m.get('name', '?')} {str(m.get('id', '?'))[:SHORT_ID]} {m.get('addr', '?')}"


def format_event(ev: Event, when: datetime.datetime | None = None) -> str:
    """One human line per watch event: time, event, member, status, incarnation, tags."""
    when = when or datetime.datetime.now().astimezone()
    d = ev.data
    line = (
        f"{when.strftime('%H:%M:%S')} {ev.event:<13} {_member_brief(d)} "
        f"{d.get('status', '?')} inc={d.get('incarnation', '?')} "
        f"tags={format_tags(d.get('tags', {}))}"
    )
    other = d.get("other")
    if isinstance(other, Mapping):
        line += f" other={_member_brief(other)}"
    return line


def _entry_node(e: Mapping[str, Any]) -> str:
    """``name (short id)`` of the node owning a registry entry."""
    node = str(e.get("node", "?"))[:SHORT_ID]
    name = e.get("node_name")
    return f"{name} ({node})" if name else node


def format_names(entries: Iterable[Mapping[str, Any]]) -> str:
    """The ``peerd names`` table: scope, name, owner node, pid, meta."""
    rows = [
        [
            str(e.get("scope", "?")),
            str(e.get("name", "?")),
            _entry_node(e),
            str(e.get("pid", "?")),
            format_tags(e.get("meta", {})),
        ]
        for e in entries
    ]
    return format_table(["SCOPE", "NAME", "NODE", "PID", "META"], rows)


def format_group_members(entries: Iterable[Mapping[str, Any]]) -> str:
    """The ``peerd members-of`` table: owner node, address, pid, meta."""
    rows = [
        [
            _entry_node(e),
            str(e.get("node_addr", "?")),
            str(e.get("pid", "?")),
            format_tags(e.get("meta", {})),
        ]
        for e in entries
    ]
    return format_table(["NODE", "ADDRESS", "PID", "META"], rows)


def format_groups(groups: Iterable[Mapping[str, Any]]) -> str:
    rows = [
        [str(g.get("scope", "?")), str(g.get("group", "?")), str(g.get("members", "?"))]
        for g in groups
    ]
    return format_table(["SCOPE", "GROUP", "MEMBERS"], rows)


def format_claimed(ms: Any) -> str:
    if not isinstance(ms, int):
        return "?"
    when = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_entry(e: Mapping[str, Any]) -> str:
    """``peerd lookup``: the owner of a name, one ``label  value`` line each."""
    fields = [
        ("name", str(e.get("name", "?"))),
        ("scope", str(e.get("scope", "?"))),
        ("node", str(e.get("node_name", "?"))),
        ("node id", str(e.get("node", "?"))),
        ("address", str(e.get("node_addr", "?"))),
        ("pid", str(e.get("pid", "?"))),
        ("uid", str(e.get("uid", "?"))),
        ("meta", format_tags(e.get("meta", {}))),
        ("claimed", format_claimed(e.get("claimed_ms"))),
    ]
    width = max(len(label) for label, _ in fields)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in fields)


REGISTRY_EVENTS = frozenset({"registered", "unregistered", "updated", "joined", "left", "conflict"})


def format_registry_event(ev: Event, when: datetime.datetime | None = None) -> str:
    """One line per registry event: time, event, kind, scope/name, owner, pid, meta."""
    when = when or datetime.datetime.now().astimezone()
    d = ev.data
    line = (
        f"{when.strftime('%H:%M:%S')} {ev.event:<13} {d.get('kind', '?')} "
        f"{d.get('scope', '?')}/{d.get('name', '?')} node={_entry_node(d)} "
        f"pid={d.get('pid', '?')} meta={format_tags(d.get('meta', {}))}"
    )
    winner = d.get("winner")
    if isinstance(winner, Mapping):
        line += f" winner={_entry_node(winner)} pid={winner.get('pid', '?')}"
    return line


def conflict_warning(ev: Event) -> str:
    """What ``peerd exec`` prints when the daemon reports a lost name."""
    d = ev.data
    w = d.get("winner") if isinstance(d.get("winner"), Mapping) else {}
    assert isinstance(w, Mapping)
    return (
        f"warning: lost the name {d.get('scope', '?')}/{d.get('name', '?')} to an older "
        f"claim by pid {w.get('pid', '?')} on node {_entry_node(w)}; this process no "
        "longer holds it"
    )


def show_payload(data: Any) -> str:
    """A payload for humans: its text if it is printable UTF-8, else hex."""
    if isinstance(data, str):
        return data
    if not isinstance(data, bytes):
        return repr(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + data.hex()
    return text if text.isprintable() else "0x" + data.hex()


def format_user_event(ev: Event, when: datetime.datetime | None = None) -> str:
    """One line per user event: time, name, origin node, payload."""
    when = when or datetime.datetime.now().astimezone()
    d = ev.data
    origin = d.get("origin_name") or str(d.get("origin", "?"))[:SHORT_ID]
    return (
        f"{when.strftime('%H:%M:%S')} event {d.get('name', '?')} from={origin} "
        f"payload={show_payload(d.get('payload', b''))}"
    )


def format_snapshot_end(ev: Event, when: datetime.datetime | None = None) -> str:
    """The line closing the snapshot of one topic (``watch --snapshot``)."""
    when = when or datetime.datetime.now().astimezone()
    d = ev.data
    return (
        f"{when.strftime('%H:%M:%S')} {ev.event:<13} topic={d.get('topic', '?')} "
        f"count={d.get('count', '?')}"
    )


def payload_json(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with its bytes ``payload`` (user events, messages) made JSON:
    the text when it is valid UTF-8 (``"payload_encoding": "utf-8"``), else
    base64 (``"payload_encoding": "base64"``)."""
    out = dict(data)
    payload = out.get("payload")
    if isinstance(payload, bytes | bytearray):
        try:
            out["payload"] = bytes(payload).decode("utf-8")
            out["payload_encoding"] = "utf-8"
        except UnicodeDecodeError:
            out["payload"] = base64.b64encode(payload).decode("ascii")
            out["payload_encoding"] = "base64"
    return out


def event_json(ev: Event, when: datetime.datetime | None = None) -> str:
    """One JSON object per line: ``{"time", "topic", "event", "data"}``; a
    payload as :func:`payload_json` makes it."""
    when = when or datetime.datetime.now(datetime.UTC)
    return json.dumps(
        {
            "time": when.isoformat(timespec="milliseconds"),
            "topic": ev.data.get("topic"),
            "event": ev.event,
            "data": payload_json(ev.data),
        },
        sort_keys=True,
        default=_json_default,
        ensure_ascii=False,
    )


def error_json(code: str, message: str) -> str:
    """What a command run with ``--json`` prints on stdout when it fails:
    ``{"error": {"code", "message"}}`` on one line (the exit code is unchanged)."""
    return json.dumps({"error": {"code": code, "message": message}}, ensure_ascii=False)


def _json_default(obj: object) -> Any:
    if isinstance(obj, bytes):
        return obj.hex()
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    return str(obj)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=_json_default, ensure_ascii=False))


# --- argument parsing helpers ----------------------------------------------------------


def parse_tag_assignment(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (the value may be empty and may contain ``=``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


Resolver = Callable[..., list[tuple[Any, ...]]]


def resolve_join_addrs(texts: Iterable[str], resolver: Resolver = socket.getaddrinfo) -> list[str]:
    """Turn the user's ``HOST[:PORT]`` arguments into the IP-literal addresses the
    daemon accepts (it never resolves names itself, so as not to block on DNS).

    IP literals pass through. A host name is resolved here, and each of its
    addresses is sent (a name may stand for several nodes). Without a port the
    daemon's default applies."""
    out: list[str] = []
    for text in texts:
        try:
            out.append(format_addr(parse_addr(text)))
            continue
        except ValueError:
            pass
        try:
            parse_addr(text, default_port=1)
            out.append(text)  # an IP literal without a port
            continue
        except ValueError as exc:
            literal_error = str(exc)
        if text.startswith("[") or text.count(":") > 1 or not text:
            _usage(literal_error)
        host, sep, port_text = text.partition(":")
        port: int | None = None
        if sep:
            if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
                _usage(f"invalid address {text!r}: port must be a number 1-65535")
            port = int(port_text)
        try:
            infos = resolver(host, port, type=socket.SOCK_DGRAM)
        except (OSError, UnicodeError) as exc:
            raise CliError(
                f"cannot resolve {host!r}: {getattr(exc, 'strerror', None) or exc}"
            ) from None
        for info in infos:
            ip = str(info[4][0])
            addr = format_addr((ip, port)) if port else (f"[{ip}]" if ":" in ip else ip)
            if addr not in out:
                out.append(addr)
    return out


def _read_key(text: str) -> str:
    """The KEY argument; ``-`` reads it from stdin so it stays out of ``ps``."""
    if text != "-":
        return text
    line = sys.stdin.readline().strip()
    if not line:
        _usage("no key on standard input")
    return line


# --- commands ---------------------------------------------------------------------------


# A daemon that accepts connections but does not answer (a wedged runner)
# must not hang a command: after this long it exits 3 like an absent daemon.
# `watch` and `exec` wait on purpose and have no limit.
CALL_TIMEOUT_S = 30.0


def _connect(args: argparse.Namespace, timeout: float | None = CALL_TIMEOUT_S) -> Any:
    from peerd.api.client import BlockingClient

    return BlockingClient(args.api_socket, timeout=timeout)


def _call(args: argparse.Namespace, op: str, **op_args: Any) -> Any:
    with _connect(args) as client:
        return client.call(op, **op_args)


def cmd_status(args: argparse.Namespace) -> int:
    status = _call(args, "status")
    if args.json:
        _print_json(status)
    else:
        print(format_status(status))
    return EXIT_OK


def _regex(text: str, what: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as exc:
        _usage(f"{what}: bad regular expression {text!r}: {exc}")


def member_filter(
    name: str | None, tags: Iterable[tuple[str, str]]
) -> Callable[[Mapping[str, Any]], bool]:
    """``members --name REGEX --tag K=REGEX ...``: the name and every given
    tag must match in full (a member without tag K does not match)."""
    name_rx = _regex(name, "--name") if name is not None else None
    tag_rxs = [(k, _regex(v, f"--tag {k}")) for k, v in tags]

    def keep(m: Mapping[str, Any]) -> bool:
        if name_rx is not None and not name_rx.fullmatch(str(m.get("name", ""))):
            return False
        member_tags = m.get("tags") or {}
        for key, rx in tag_rxs:
            value = member_tags.get(key)
            if not isinstance(value, str) or not rx.fullmatch(value):
                return False
        return True

    return keep


def cmd_members(args: argparse.Namespace) -> int:
    keep = member_filter(args.name, args.tag or ())
    members = _call(args, "members")
    if args.status:
        members = [m for m in members if m.get("status") in args.status]
    members = [m for m in members if keep(m)]
    members = sorted(members, key=_member_sort_key)
    if args.json:
        _print_json(members)
    else:
        print(format_members(members))
    return EXIT_OK


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


# --- registry commands ----------------------------------------------------------------


def cmd_names(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        entries = client.names(scope=args.scope, prefix=args.prefix)
    if args.json:
        _print_json(entries)
    else:
        print(format_names(entries))
    return EXIT_OK


def cmd_lookup(args: argparse.Namespace) -> int:
    entry = _call(args, "lookup", name=args.name, scope=args.scope)
    if args.json:
        _print_json(entry)
    else:
        print(format_entry(entry))
    return EXIT_OK


def cmd_groups(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        groups = client.groups(scope=args.scope, prefix=args.prefix)
    if args.json:
        _print_json(groups)
    else:
        print(format_groups(groups))
    return EXIT_OK


def cmd_members_of(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        entries = client.group_members(args.group, scope=args.scope)
    if args.json:
        _print_json(entries)
    else:
        print(format_group_members(entries))
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


def cmd_tags_set(args: argparse.Namespace) -> int:
    tags = dict(args.assignments)
    _print_tags(_call(args, "set-tags", tags=tags, replace=args.replace))
    return EXIT_OK


def cmd_tags_delete(args: argparse.Namespace) -> int:
    # A null value deletes the key in the daemon, in one atomic update.
    tags: dict[str, str | None] = dict.fromkeys(args.keys)
    _print_tags(_call(args, "set-tags", tags=tags))
    return EXIT_OK


def _print_tags(tags: Mapping[str, str]) -> None:
    for key, value in sorted(tags.items()):
        print(f"{key}={value}")


def cmd_metrics(args: argparse.Namespace) -> int:
    from peerd.shell.metrics import render

    sys.stdout.write(render(_call(args, "status")))
    return EXIT_OK


def cmd_leave(args: argparse.Namespace) -> int:
    _call(args, "leave")
    print("left the cluster; the daemon is stopping")
    return EXIT_OK


def cmd_join(args: argparse.Namespace) -> int:
    addrs = resolve_join_addrs(args.addrs)
    result = _call(args, "join", addrs=addrs)
    ok, failed = result.get("ok", 0), result.get("failed", 0)
    print(f"joined: {ok} answered, {failed} failed")
    if ok == 0:
        raise CliError("no address answered")
    return EXIT_OK


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from peerd.wire.seal import generate_key

    print(generate_key())
    return EXIT_OK


def cmd_keys_list(args: argparse.Namespace) -> int:
    keys = _call(args, "keys.list", file=True)
    if args.json:
        _print_json(keys)
        return EXIT_OK
    with_file = any("in_file" in k for k in keys)
    rows = []
    differs = False
    for k in keys:
        row = [str(k.get("id", "?"))]
        row.append("primary" if k.get("primary") else ("-" if k.get("installed") is False else ""))
        if with_file:
            in_file = k.get("in_file")
            row.append("primary" if k.get("file_primary") else ("yes" if in_file else "no"))
            differs = differs or (
                k.get("installed") is False
                or not in_file
                or bool(k.get("primary")) != bool(k.get("file_primary"))
            )
        rows.append(row)
    print(format_table(["ID", "KEYRING", "KEY FILE"] if with_file else ["ID", "ROLE"], rows))
    if differs:
        print(
            "peerd keys: the running keyring and the key file differ (KEYRING '-': only in the "
            "file). Keys changed over the API are saved in the state directory's keyring, "
            "which wins over the key file at start and reload; a node started from the key "
            "file alone may not be able to join. Update the key file to match.",
            file=sys.stderr,
        )
    return EXIT_OK


def _key_command(op: str, done: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        extra: dict[str, Any] = {}
        if getattr(args, "force", False):
            extra["force"] = True
        if args.cluster:
            extra["cluster"] = True
        result = _call(args, op, key=_read_key(args.key), **extra)
        if args.cluster and (not isinstance(result, dict) or "nodes" not in result):
            # An older daemon ignores the "cluster" argument it does not know.
            print(
                "peerd keys: the daemon ignored --cluster (an older peerd?): it acted "
                "on this node only",
                file=sys.stderr,
            )
            return EXIT_FAILED
        if args.json:
            _print_json(result)
            return EXIT_FAILED if args.cluster and result.get("failed") else EXIT_OK
        if args.cluster:
            nodes = result["nodes"]
            rows = [
                [
                    str(n.get("name", "?")),
                    str(n.get("addr", "?")),
                    "ok" if n.get("ok") else str(n.get("status", "failed")),
                    str(n.get("primary") or "-"),
                    ",".join(n.get("keys") or []) or "-",
                    str(n.get("message", "")),
                ]
                for n in nodes
            ]
            print(format_table(["NODE", "ADDR", "RESULT", "PRIMARY", "KEYS", "MESSAGE"], rows))
            failed = sum(1 for n in nodes if not n.get("ok"))
            print(f"{done} on {len(nodes) - failed} of {len(nodes)} nodes")
            return EXIT_FAILED if failed else EXIT_OK
        else:
            print(done)
        return EXIT_OK

    return run


def cmd_agent(args: argparse.Namespace) -> int:
    agent = _import_agent()
    if agent is None:
        raise CliError("the agent is not available in this installation (peerd.shell.agent)")
    code: int = agent.run(args)
    return code


def _import_agent() -> Any:
    try:
        import peerd.shell.agent as agent
    except ModuleNotFoundError as exc:
        if exc.name not in ("peerd.shell.agent", "peerd.shell"):
            raise
        return None
    return agent


# --- parser -------------------------------------------------------------------------------

DESCRIPTION = """\
peerd: a masterless peer-to-peer membership and registry daemon.

`peerd agent` runs the daemon on this host. The other commands talk to the
local daemon through its API socket."""

EPILOG = """\
API socket: --api-socket PATH, else $PEERD_API_SOCKET, else /run/peerd/peerd.sock
for root, else $XDG_RUNTIME_DIR/peerd/peerd.sock, else /tmp/peerd-UID/peerd.sock.

exit codes: 0 ok, 1 operation failed (the daemon said no), 2 usage error,
3 daemon not reachable. Run `peerd COMMAND --help` for details."""


def _client_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--api-socket", metavar="PATH", help="the daemon's API socket (default: see `peerd --help`)"
    )
    return common


class _UsageError(Exception):
    """A command-line usage error while ``--json`` was given."""


class _Parser(argparse.ArgumentParser):
    """argparse, but under ``--json`` a usage error is raised (and printed as
    JSON by :func:`main`) instead of printed as text. Subcommand parsers are
    of the same class (argparse makes them with ``type(parent)``)."""

    json_errors = False  # set by main() for the duration of one parse

    def error(self, message: str) -> NoReturn:
        if _Parser.json_errors:
            raise _UsageError(f"{self.prog}: {message}")
        super().error(message)


def build_parser(with_agent_flags: bool = False) -> argparse.ArgumentParser:
    """The whole command line. ``with_agent_flags`` imports the agent to add its
    flags; only done when the agent subcommand is what runs."""
    # The top level keeps its hand-made line breaks; subcommands' prose is rewrapped.
    parser: argparse.ArgumentParser = _Parser(
        prog="peerd",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"peerd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    client = _client_options()

    def add(
        name: str,
        summary: str,
        description: str,
        parents: Sequence[argparse.ArgumentParser] = (client,),
    ) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=description, parents=list(parents))

    agent = add(
        "agent",
        "run the daemon (see `peerd agent --help`)",
        "Run the peerd daemon in the foreground (systemd runs it as a service).",
        parents=(),
    )
    agent.set_defaults(func=cmd_agent)
    if with_agent_flags:
        module = _import_agent()
        if module is not None:
            module.add_arguments(agent)

    p = add(
        "status",
        "show this node's identity, health and member counts",
        "Show this node's name, id, address, incarnation, generation, Lifeguard health "
        "(0 = healthy) and how many members are alive, suspect, dead or left.",
    )
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    p.set_defaults(func=cmd_status)

    p = add(
        "members",
        "list the members of the cluster",
        "List every member this node knows (itself included): name, short id, address, "
        "status, incarnation, tags. Sorted by name. --tag and --name select by "
        "regular expressions matched in full (Serf's members -tag, -name).",
    )
    p.add_argument(
        "--json", action="store_true", help="print a JSON list (full ids, tags as objects)"
    )
    p.add_argument(
        "--status",
        choices=MEMBER_STATUSES,
        action="append",
        help="only members with this status (repeatable)",
    )
    p.add_argument(
        "--name",
        metavar="REGEX",
        help="only members whose name matches REGEX in full (Python re syntax)",
    )
    p.add_argument(
        "--tag",
        action="append",
        type=parse_tag_assignment,
        metavar="KEY=REGEX",
        help="only members with tag KEY whose value matches REGEX in full "
        "(repeatable: all must match)",
    )
    p.set_defaults(func=cmd_members)

    p = add(
        "watch",
        "print membership (or registry) events as they happen",
        "Print one line per membership event (joined, updated, suspect, alive, dead, "
        "left, name_conflict, reaped), or with --topic registry per registry event "
        "(registered, unregistered, updated, joined, left, conflict), or with --topic "
        "events per user event, until interrupted with Ctrl-C.",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='one JSON object per line: {"time", "topic", "event", "data"}; a payload is '
        'its text when it is valid UTF-8, else base64, as "payload_encoding" says',
    )
    p.add_argument(
        "--snapshot",
        action="store_true",
        help="first the current state (members: a `member` line each; registry: an "
        "`entry` line each), a `snapshot_end` line per topic, then the changes, with "
        "no gap between them",
    )
    p.add_argument(
        "--topic",
        choices=("members", "registry", "events"),
        action="append",
        help="what to watch (repeatable; default: members; events: user events "
        "sent with `peerd event`)",
    )
    p.set_defaults(func=cmd_watch)

    p = add(
        "event",
        "broadcast a user event to every node",
        "Broadcast user event NAME with an optional PAYLOAD (text) to every node of the "
        "cluster; `peerd watch --topic events` shows them (on this node too). Name and "
        "payload together may take at most 8 KiB; larger is refused (exit 1). User "
        "events are rate limited and travel behind the daemon's own traffic.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("payload", metavar="PAYLOAD", nargs="?", default="")
    p.add_argument("--json", action="store_true", help='print {"id": ...} of the broadcast')
    p.set_defaults(func=cmd_event)

    p = add(
        "send",
        "send a message to the process holding a name",
        "Send PAYLOAD (text) to the process holding NAME anywhere in the cluster (with "
        "--group, to one member of group NAME; with --all, to every member). The "
        "receiving process gets it as a `message` event on its API connection. Exit 0 "
        "once the owner's daemon queued it; 1 with the reason if nobody holds NAME, the "
        "owner vanished, its mailbox is full or its daemon could not be reached (a "
        "message is never delivered twice), or its holder takes no messages "
        "(no_receiver: a name held by peerd exec). With --reply-to TOKEN (and no NAME), "
        "answer the connection that sent a message (its event's reply_to).",
    )
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("payload", metavar="PAYLOAD")
    p.add_argument(
        "--reply-to",
        metavar="TOKEN",
        help="answer the connection that sent a message: the reply_to of its event",
    )
    p.add_argument("--group", action="store_true", help="NAME is a process group")
    p.add_argument("--all", action="store_true", help="with --group: every member")
    p.add_argument("--scope", default="default", help="the scope (default: default)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_send)

    scope_help = "the scope (default: default)"
    p = add(
        "names",
        "list registered names",
        "List the unique names registered anywhere in the cluster (this node's "
        "replica): scope, name, owner node, pid, metadata. Sorted by scope and name.",
    )
    p.add_argument("--scope", help="only this scope (default: every scope)")
    p.add_argument("--prefix", default="", help="only names starting with this")
    p.add_argument("--json", action="store_true", help="print a JSON list of entries")
    p.set_defaults(func=cmd_names)

    p = add(
        "lookup",
        "show who holds a name",
        "Print the owner of NAME: node name, node id and address, pid, uid, metadata, "
        "claim time. Exit 1 if nobody holds it.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--scope", default="default", help=scope_help)
    p.add_argument("--json", action="store_true", help="print the entry as JSON")
    p.set_defaults(func=cmd_lookup)

    p = add(
        "groups",
        "list process groups and their sizes",
        "List the process groups of the cluster with how many members each has.",
    )
    p.add_argument("--scope", help="only this scope (default: every scope)")
    p.add_argument("--prefix", default="", help="only groups starting with this")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=cmd_groups)

    p = add(
        "members-of",
        "list the members of a process group",
        "List the processes in GROUP: owner node, address, pid, metadata.",
    )
    p.add_argument("group", metavar="GROUP")
    p.add_argument("--scope", default="default", help=scope_help)
    p.add_argument("--json", action="store_true", help="print a JSON list of entries")
    p.set_defaults(func=cmd_members_of)

    p = add(
        "exec",
        "run a command holding names and group memberships",
        "Register each --name and join each --group, then run COMMAND; the "
        "registrations last exactly as long as it runs (they are removed cluster-wide "
        "when it exits, or if this process is killed). Fails with exit 1 if a name is "
        "taken. SIGTERM, SIGHUP, SIGUSR1/2 (and SIGINT/SIGQUIT not from the terminal) "
        "are passed to COMMAND. Each name is first acknowledged by every live member "
        "(--no-settle skips that) and COMMAND does not start if an older claim wins. If a "
        "name is lost while COMMAND runs, COMMAND is stopped (--on-lose). The entries take "
        "no messages: a send to them fails with no_receiver. Exits with COMMAND's status "
        "(128+N if killed by signal N); 1 if a name is taken; 4 if COMMAND was stopped "
        "because a name was lost, 5 because the connection to the daemon was lost.",
    )
    p.add_argument(
        "--name",
        dest="names",
        action="append",
        default=[],
        metavar="NAME",
        help="a unique name to hold (repeatable)",
    )
    p.add_argument(
        "--group",
        dest="groups",
        action="append",
        default=[],
        metavar="GROUP",
        help="a process group to be in (repeatable)",
    )
    p.add_argument("--scope", default="default", help=scope_help)
    p.add_argument(
        "--meta",
        action="append",
        type=parse_tag_assignment,
        metavar="KEY=VALUE",
        help="metadata for every entry (repeatable)",
    )
    p.add_argument(
        "--no-settle",
        action="store_true",
        help="start COMMAND as soon as the local daemon took each name, without waiting "
        "for every live member to acknowledge it (a concurrent claim elsewhere may then "
        "win after COMMAND started)",
    )
    p.add_argument(
        "--settled",
        action="store_true",
        help="accepted for compatibility: waiting for the claim to settle is the default",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="bound on the settle wait (default 5 s; past it COMMAND starts with a warning)",
    )
    p.add_argument(
        "--on-lose",
        choices=("term", "warn"),
        default="term",
        help="when a name is lost to an older claim elsewhere (or the connection to the "
        "daemon, and with it the names) while COMMAND runs: term (default) stops it, "
        "SIGTERM then SIGKILL after --grace, and exits 4 (5 for the connection); warn "
        "only prints a warning",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds between SIGTERM and SIGKILL with --on-lose term (default 10)",
    )
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ARGS")
    p.set_defaults(func=cmd_exec)

    tags = add(
        "tags",
        "change this node's tags",
        "Tags are key=value labels gossiped with this node's membership. Changes "
        "made here are kept in the state directory over restarts, until the config "
        "file's [tags] (or a --tag flag) changes the same key.",
        parents=(),
    )
    tags_sub = tags.add_subparsers(dest="tags_command", metavar="ACTION", required=True)
    p = tags_sub.add_parser(
        "set",
        parents=[client],
        help="set tags (KEY=VALUE ...)",
        description="Set tags; others are kept unless --replace. "
        "Prints the node's tags afterwards.",
    )
    p.add_argument("assignments", nargs="+", type=parse_tag_assignment, metavar="KEY=VALUE")
    p.add_argument("--replace", action="store_true", help="drop every tag not given here")
    p.set_defaults(func=cmd_tags_set)
    p = tags_sub.add_parser(
        "delete",
        parents=[client],
        help="delete tags by key",
        description="Delete tags (missing keys are ignored). Prints the node's tags afterwards.",
    )
    p.add_argument("keys", nargs="+", metavar="KEY")
    p.set_defaults(func=cmd_tags_delete)

    p = add(
        "join",
        "contact more peers and merge their view of the cluster",
        "Ask the daemon to join peers. HOST may be an IP address or a name (resolved "
        "here; every address it resolves to is tried). Without :PORT the daemon's "
        "default port is used. IPv6 with a port: [ADDR]:PORT. Fails (exit 1) if no "
        "address answered.",
    )
    p.add_argument("addrs", nargs="+", metavar="HOST[:PORT]")
    p.set_defaults(func=cmd_join)

    p = add(
        "metrics",
        "print the daemon's counters and gauges (Prometheus text format)",
        "Print the daemon's metrics in the Prometheus text exposition format: members "
        "by status, probes, suspicions, refutations, messages and bytes in/out by type, "
        "drops by reason, API connections. `peerd agent --metrics-addr HOST:PORT` serves "
        "the same text over HTTP at /metrics.",
    )
    p.set_defaults(func=cmd_metrics)

    p = add(
        "sim",
        "run a scenario in the deterministic simulator (no daemon needed)",
        "Run SCENARIO.toml (see scenarios/) in the simulator: many cores, a virtual "
        "clock, a fake network, injected faults. Exit 0 if every expectation held, 1 if "
        "one failed, 2 for a bad scenario file.",
        parents=(),
    )
    from peerd.sim import cli as sim_cli

    sim_cli.add_arguments(p)
    p.set_defaults(func=sim_cli.cmd_sim)

    p = add(
        "leave",
        "leave the cluster gracefully; the daemon then stops",
        "Announce that this node leaves, wait until the announcement had time to "
        "spread, then let the daemon stop. Peers see it as 'left', not 'dead'.",
    )
    p.set_defaults(func=cmd_leave)

    keys = add(
        "keys",
        "manage the keys that encrypt gossip",
        "Gossip is sealed with the primary key; every installed key is accepted. "
        "To rotate: generate, install on every node, use on every node, then remove "
        "the old key. KEY may be - to read it from standard input (keeps it out of "
        "the process list).",
        parents=(),
    )
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    p = keys_sub.add_parser(
        "generate",
        help="print a new random key (no daemon needed)",
        description="Print a new random key as one line.",
    )
    p.set_defaults(func=cmd_keys_generate)
    p = keys_sub.add_parser(
        "list",
        parents=[client],
        help="list installed keys",
        description="List the ids of the installed keys; the primary one seals outgoing gossip.",
    )
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=cmd_keys_list)
    for action, op, text, done in [
        (
            "install",
            "keys.install",
            "add a key to the keyring (accepted for opening)",
            "key installed",
        ),
        (
            "use",
            "keys.use",
            "make an installed key the primary (used for sealing)",
            "key is now primary",
        ),
        ("remove", "keys.remove", "remove a key that is not the primary", "key removed"),
    ]:
        p = keys_sub.add_parser(action, parents=[client], help=text, description=text + ".")
        if action == "install":
            p.add_argument("key", metavar="KEY", help="the key, or - to read it from stdin")
            p.add_argument(
                "--force",
                action="store_true",
                help="install even on a node without keys (it then seals with KEY and "
                "is cut off from peers without keys)",
            )
        else:
            p.add_argument(
                "key",
                metavar="KEY",
                help="the key, its id as `keys list` shows it (or a unique prefix of "
                "it), or - to read it from stdin",
            )
        p.add_argument(
            "--cluster",
            action="store_true",
            help="on every live member, with a report per node; refused, with nothing "
            "changed, if it would cut a member off",
        )
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        p.set_defaults(func=_key_command(op, done))
    return parser


def _command_name(argv: Sequence[str]) -> str | None:
    """The subcommand, found without parsing (the parser depends on it)."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg
        if arg == "--":
            return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_name(argv)
    parser = build_parser(with_agent_flags=command == "agent")
    own = argv[: argv.index("--")] if "--" in argv else argv
    _Parser.json_errors = "--json" in own
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:  # a usage error under --json
        print(error_json("usage", str(exc)), flush=True)
        return EXIT_USAGE
    except SystemExit as exc:  # --help, --version, usage errors: argparse printed them
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    finally:
        _Parser.json_errors = False
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    where = f"peerd {args.command}"
    as_json = bool(getattr(args, "json", False))

    def fail(code: str, message: str, exit_code: int, text: str) -> int:
        # Under --json the error is one JSON line on stdout (where the
        # consumer reads); otherwise one line on stderr. Same exit codes.
        if as_json:
            print(error_json(code, message), flush=True)
        else:
            print(f"{where}: {text}", file=sys.stderr)
        return exit_code

    try:
        code: int = args.func(args)
        return code
    except CliError as exc:
        kind = ERROR_KINDS.get(exc.exit_code, "failed")
        return fail(kind, str(exc), exc.exit_code, str(exc))
    except ApiError as exc:
        return fail(exc.code, exc.message, EXIT_FAILED, f"{exc.message} ({exc.code})")
    except BrokenPipeError:
        # Output piped into `head` and friends: not an error. (The client
        # turns socket errors into ConnectionLost, so this is stdout.) Point
        # stdout at /dev/null so the interpreter's final flush does not complain.
        _silence_stdout()
        return EXIT_OK
    except (ConnectionError, TimeoutError) as exc:  # DaemonUnavailable, ConnectionLost
        return fail("unreachable", str(exc), EXIT_UNREACHABLE, str(exc))
    except KeyboardInterrupt:
        return 130


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
