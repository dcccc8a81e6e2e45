"""What every client command shares: exit codes, the error it raises, and the
connection to the daemon.

A command never hangs on a wedged daemon (calls time out and exit 3 like an
absent one), and the API client is imported only when a command connects, so
``peerd --help`` and usage errors cost no client import.
"""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

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
