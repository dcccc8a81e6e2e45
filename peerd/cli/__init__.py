"""The ``peerd`` command: ``peerd agent`` runs the daemon; every other
subcommand is a small client of the local daemon's API socket.

Exit codes (all subcommands but ``agent``, which documents its own):
0 success; 1 the daemon refused or the operation failed; 2 usage error;
3 the daemon could not be reached.

The agent's flags live with the agent (:mod:`peerd.shell.agent`), imported only
when ``peerd agent`` runs: client commands then start fast and work even where
the daemon's dependencies are not importable.

The package is split by command group (:mod:`~peerd.cli.cluster`,
:mod:`~peerd.cli.registry`, :mod:`~peerd.cli.messages`, :mod:`~peerd.cli.keys`),
with the parser in :mod:`~peerd.cli.parser`, shared plumbing in
:mod:`~peerd.cli.common` and output in :mod:`~peerd.cli.format`. Heavy modules
(the API client, the agent, the simulator's commands) are imported inside the
commands that need them, as before.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from peerd.api.protocol import ApiError
from peerd.cli.cluster import (
    Resolver,
    cmd_join,
    cmd_leave,
    cmd_members,
    cmd_metrics,
    cmd_status,
    cmd_tags_delete,
    cmd_tags_set,
    member_filter,
    parse_tag_assignment,
    resolve_join_addrs,
)
from peerd.cli.common import (
    CALL_TIMEOUT_S,
    ERROR_KINDS,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    MEMBER_STATUSES,
    SHORT_ID,
    CliError,
)
from peerd.cli.format import (
    REGISTRY_EVENTS,
    conflict_warning,
    error_json,
    event_json,
    format_claimed,
    format_entry,
    format_event,
    format_group_members,
    format_groups,
    format_members,
    format_names,
    format_registry_event,
    format_snapshot_end,
    format_status,
    format_table,
    format_tags,
    format_user_event,
    payload_json,
    show_payload,
)
from peerd.cli.keys import cmd_keys_generate, cmd_keys_list
from peerd.cli.messages import (
    EXIT_DAEMON_LOST,
    EXIT_NAME_LOST,
    SI_KERNEL,
    cmd_event,
    cmd_exec,
    cmd_send,
    cmd_watch,
)
from peerd.cli.parser import DESCRIPTION, EPILOG, _Parser, _UsageError, build_parser, cmd_agent
from peerd.cli.registry import cmd_groups, cmd_lookup, cmd_members_of, cmd_names

__all__ = [
    "CALL_TIMEOUT_S",
    "CliError",
    "DESCRIPTION",
    "EPILOG",
    "ERROR_KINDS",
    "EXIT_DAEMON_LOST",
    "EXIT_FAILED",
    "EXIT_NAME_LOST",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "MEMBER_STATUSES",
    "REGISTRY_EVENTS",
    "Resolver",
    "SHORT_ID",
    "SI_KERNEL",
    "build_parser",
    "cmd_agent",
    "cmd_event",
    "cmd_exec",
    "cmd_groups",
    "cmd_join",
    "cmd_keys_generate",
    "cmd_keys_list",
    "cmd_leave",
    "cmd_lookup",
    "cmd_members",
    "cmd_members_of",
    "cmd_metrics",
    "cmd_names",
    "cmd_send",
    "cmd_status",
    "cmd_tags_delete",
    "cmd_tags_set",
    "cmd_watch",
    "conflict_warning",
    "error_json",
    "event_json",
    "format_claimed",
    "format_entry",
    "format_event",
    "format_group_members",
    "format_groups",
    "format_members",
    "format_names",
    "format_registry_event",
    "format_snapshot_end",
    "format_status",
    "format_table",
    "format_tags",
    "format_user_event",
    "main",
    "member_filter",
    "parse_tag_assignment",
    "payload_json",
    "resolve_join_addrs",
    "show_payload",
]


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
