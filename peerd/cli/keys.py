"""Key commands: generate, list, install, use, remove.

Keys are read from standard input or a file, never from the command line
(where other users could see them in the process list). ``--cluster`` asks the
local daemon to apply the change on every live member.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from peerd.cli.common import EXIT_FAILED, EXIT_OK, _call, _usage
from peerd.cli.format import _print_json, format_table


def _read_key(text: str) -> str:
    """The KEY argument; ``-`` reads it from stdin so it stays out of ``ps``."""
    if text != "-":
        return text
    line = sys.stdin.readline().strip()
    if not line:
        _usage("no key on standard input")
    return line


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
