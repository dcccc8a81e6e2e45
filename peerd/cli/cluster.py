"""Cluster commands: status, members, tags, join, leave, metrics.

Each is one API call and a printout. Filters (``members --status/--name/--tag``)
run here on the full member list rather than in the daemon: the list is one
reply of bounded size, and the daemon's API stays small. ``join`` resolves
host names here, so the daemon is only ever given addresses.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from peerd.api.protocol import format_addr, parse_addr
from peerd.cli.common import EXIT_OK, CliError, _call, _usage
from peerd.cli.format import _member_sort_key, _print_json, format_members, format_status


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
