"""Registry commands: names, lookup, groups, group members.

Reads of the daemon's local replica, paged by the daemon; these commands only
print what one page or lookup returns.
"""

from __future__ import annotations

import argparse

from peerd.cli.common import EXIT_OK, _call, _connect
from peerd.cli.format import (
    _print_json,
    format_entry,
    format_group_members,
    format_groups,
    format_names,
)


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
